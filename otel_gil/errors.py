"""Errors otel-gil reports to people. Each carries its remedy.

The CLI turns an :class:`OtelGilError` into one line on stderr and a non-zero
exit status, never a traceback. Library code raises these (and only these) for
conditions a user can act on.
"""

from __future__ import annotations


class OtelGilError(Exception):
    """Base class: ``str(err)`` is the problem, :attr:`remedy` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, remedy: str = "") -> None:
        super().__init__(message)
        self.remedy = remedy

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.remedy})" if self.remedy else text


class TargetError(OtelGilError):
    """The target process or interpreter cannot be traced (absent, not Python, no symbols)."""

    exit_code = 2


class NotPythonError(TargetError):
    """The process or file holds no CPython at all (not: a CPython we cannot trace)."""


class GilDisabledError(TargetError):
    """A free-threaded build running with the GIL disabled: nothing to measure."""

    exit_code = 3


class ProbeError(OtelGilError):
    """Compiling, loading or attaching the BPF program failed."""

    exit_code = 4


class EnvironmentProblem(OtelGilError):
    """The machine lacks something tracing needs (privileges, BCC, headers, kernel features)."""

    exit_code = 5
