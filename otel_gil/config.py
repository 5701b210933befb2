"""Options of `otel_gil.instrument()` and the sidecar, with their environment variables.

Each option can be passed to instrument() as a keyword argument (which wins)
or set through the environment variable named here. docs/configuration.md lists
them; a test keeps the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional

OTEL_PYTHON_GIL_MODE = "OTEL_PYTHON_GIL_MODE"
"""`auto` (default): connect to a sidecar socket when one is configured or present,
else spawn a private sidecar when this process may use eBPF, else warn once and do
nothing. `connect`, `spawn`: only that. `off`: do nothing."""

OTEL_PYTHON_GIL_SOCKET = "OTEL_PYTHON_GIL_SOCKET"
"""Unix socket of a long-running sidecar (`otel-gil sidecar --listen PATH`).
Default /run/otel-gil/otel-gil.sock."""

OTEL_PYTHON_GIL_SIDECAR_PYTHON = "OTEL_PYTHON_GIL_SIDECAR_PYTHON"
"""Interpreter that runs a spawned sidecar. Default: the app's own interpreter,
with the OS's `bcc` module (python3-bpfcc) made importable for it."""

OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS = "OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS"
"""Waits at least this long become `gil.wait` spans (default 1)."""

OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS = "OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS"
"""Holds at least this long become `gil.hold` spans (default 50)."""

OTEL_PYTHON_GIL_START_TIMEOUT_S = "OTEL_PYTHON_GIL_START_TIMEOUT_S"
"""How long the background start may take before giving up (default 30)."""

OTEL_PYTHON_GIL_PROMETHEUS_PORT = "OTEL_PYTHON_GIL_PROMETHEUS_PORT"
"""Sidecar: port of the Prometheus metrics endpoint (default 9464; 0 turns it off)."""

OTEL_PYTHON_GIL_MAX_THREAD_LABELS = "OTEL_PYTHON_GIL_MAX_THREAD_LABELS"
"""Sidecar: distinct thread names per process used as metric labels (default 20);
further threads are reported as `other`."""

DEFAULT_SOCKET = "/run/otel-gil/otel-gil.sock"
MODES = ("auto", "connect", "spawn", "off")


@dataclass(frozen=True)
class Options:
    mode: str = "auto"
    socket: str = DEFAULT_SOCKET
    sidecar_python: str = ""
    wait_threshold_ms: float = 1.0
    hold_threshold_ms: float = 50.0
    start_timeout_s: float = 30.0
    prometheus_port: int = 9464
    max_thread_labels: int = 20

    @property
    def socket_configured(self) -> bool:
        return bool(os.environ.get(OTEL_PYTHON_GIL_SOCKET))


ENV: Dict[str, str] = {
    "mode": OTEL_PYTHON_GIL_MODE,
    "socket": OTEL_PYTHON_GIL_SOCKET,
    "sidecar_python": OTEL_PYTHON_GIL_SIDECAR_PYTHON,
    "wait_threshold_ms": OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS,
    "hold_threshold_ms": OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS,
    "start_timeout_s": OTEL_PYTHON_GIL_START_TIMEOUT_S,
    "prometheus_port": OTEL_PYTHON_GIL_PROMETHEUS_PORT,
    "max_thread_labels": OTEL_PYTHON_GIL_MAX_THREAD_LABELS,
}


def load(overrides: Optional[Mapping[str, Any]] = None,
         environ: Optional[Mapping[str, str]] = None) -> Options:
    """Options from keyword overrides, then the environment, then defaults.
    Raises ValueError naming the bad option (instrument() logs it and no-ops)."""
    env = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(ENV)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values: Dict[str, Any] = {}
    for f in fields(Options):
        raw = overrides.get(f.name, env.get(ENV[f.name]))
        if raw is None or raw == "":
            continue
        try:
            value = type(f.default)(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{ENV[f.name]}={raw!r} is not a valid {f.name}") from None
        if isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"{ENV[f.name]}={raw!r} must not be negative")
        values[f.name] = value
    opts = Options(**values)
    if opts.mode not in MODES:
        raise ValueError(f"{OTEL_PYTHON_GIL_MODE}={opts.mode!r}: use one of {', '.join(MODES)}")
    return opts
