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


class TargetNotReady(TargetError):
    """The process is not (yet) a running interpreter: libpython or libc not mapped
    yet, the runtime not initialised, the GIL not created. From outside, a program
    that will never load Python looks the same until it exits, so this is raised for
    it too; ``otel-gil run`` retries while its child runs."""


class TargetGone(TargetError):
    """The process does not exist, or is exiting (a zombie, or past the point where
    the kernel unmaps its memory): its /proc entries vanish while it is read."""


class NotPythonError(TargetNotReady):
    """The process or file holds no CPython at all (not: a CPython we cannot trace).
    A kind of TargetNotReady: a process may still exec or load one (`otel-gil run`)."""


class GilDisabledError(TargetError):
    """A free-threaded build running with the GIL disabled: nothing to measure."""

    exit_code = 3


class ProbeError(OtelGilError):
    """Compiling, loading or attaching the BPF program failed."""

    exit_code = 4


class EnvironmentProblem(OtelGilError):
    """The machine lacks something tracing needs (privileges, BCC, headers, kernel features)."""

    exit_code = 5
