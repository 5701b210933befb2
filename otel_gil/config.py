"""Options of `otel_gil.instrument()` and the sidecar, with their environment variables.

Each option can be passed to instrument() as a keyword argument (which wins)
or set through the environment variable named here. docs/configuration.md is
generated from DOCS (`python -m otel_gil.config`); a test keeps the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional

OTEL_PYTHON_GIL_MODE = "OTEL_PYTHON_GIL_MODE"
OTEL_PYTHON_GIL_SOCKET = "OTEL_PYTHON_GIL_SOCKET"
OTEL_PYTHON_GIL_SIDECAR_PYTHON = "OTEL_PYTHON_GIL_SIDECAR_PYTHON"
OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS = "OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS"
OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS = "OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS"
OTEL_PYTHON_GIL_STACK_THRESHOLD_MS = "OTEL_PYTHON_GIL_STACK_THRESHOLD_MS"
OTEL_PYTHON_GIL_START_TIMEOUT_S = "OTEL_PYTHON_GIL_START_TIMEOUT_S"
OTEL_PYTHON_GIL_PROMETHEUS_PORT = "OTEL_PYTHON_GIL_PROMETHEUS_PORT"
OTEL_PYTHON_GIL_MAX_THREAD_LABELS = "OTEL_PYTHON_GIL_MAX_THREAD_LABELS"
OTEL_PYTHON_GIL_RINGBUF_PAGES = "OTEL_PYTHON_GIL_RINGBUF_PAGES"
OTEL_PYTHON_GIL_PROBES = "OTEL_PYTHON_GIL_PROBES"
OTEL_PYTHON_GIL_SPAN_QUEUE_MB = "OTEL_PYTHON_GIL_SPAN_QUEUE_MB"

# What each variable does: docs/configuration.md is generated from this.
DOCS: Dict[str, str] = {
    OTEL_PYTHON_GIL_MODE:
        "`auto` (default): connect to a sidecar socket when one is configured or present, "
        "else spawn a private sidecar when this process may use eBPF, else warn once and do "
        "nothing. `connect`, `spawn`: only that. `off`: do nothing.",
    OTEL_PYTHON_GIL_SOCKET:
        "Unix socket of a long-running sidecar (`otel-gil sidecar --listen PATH`); "
        "`@name` for the abstract namespace.",
    OTEL_PYTHON_GIL_SIDECAR_PYTHON:
        "Interpreter that runs a spawned sidecar. Default: the app's own, with the OS's "
        "`bcc` module (python3-bpfcc) made importable for it.",
    OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS: "Waits at least this long become `gil.wait` spans.",
    OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS: "Holds at least this long become `gil.hold` spans.",
    OTEL_PYTHON_GIL_STACK_THRESHOLD_MS: "Holder stacks: a holder that keeps the CPU has its "
    "stack taken once its hold lasts this long, and `gil.wait` spans at least this long carry "
    "their holder's stack (`code.stacktrace`). 0: no holder stacks.",
    OTEL_PYTHON_GIL_START_TIMEOUT_S:
        "How long the background start (sidecar compile and attach) may take.",
    OTEL_PYTHON_GIL_PROMETHEUS_PORT:
        "Sidecar: port of the Prometheus metrics endpoint (0: none).",
    OTEL_PYTHON_GIL_MAX_THREAD_LABELS:
        "Sidecar: distinct thread names per process used as metric labels; further "
        "threads are reported as `other`.",
    OTEL_PYTHON_GIL_RINGBUF_PAGES:
        "Sidecar: size of the kernel's event ring buffer, in 4 KiB pages (a power of two). "
        "Events that find it full are counted in `otel_gil.lost_events`.",
    OTEL_PYTHON_GIL_PROBES:
        "Probe set of a spawned sidecar. `contended` (default): only code that runs when a "
        "thread must wait for the GIL is probed, so an uncontended hand-off costs nothing; "
        "waits, their holders, hand-offs and forced switches are exact, hold times only "
        "while another thread waits. `all`: every acquisition and release as well (exact "
        "holds; about 1-2 µs per GIL hand-off, bench/README.md).",
    OTEL_PYTHON_GIL_SPAN_QUEUE_MB:
        "Sidecar: memory bound of its span export queue (MiB of encoded spans, ~2.4 KB "
        "per `gil.wait` with 16 holders). When the OTLP endpoint is slow, down or "
        "black-holed, spans beyond it are dropped and counted (`otel_gil.spans.dropped`, "
        "reason `queue_full`). Events decoded but not yet exported (a sidecar short of "
        "CPU) are bounded with it, at up to 4 times as much memory (~4 KB each), and "
        "dropped and counted the same way beyond. A wait under no sampled span is never "
        "queued: it is counted at once in `otel_gil.spans.skipped` (reason `outside_span` "
        "or `unsampled`), backlog or not.",
}

DEFAULT_SOCKET = "/run/otel-gil/otel-gil.sock"
MODES = ("auto", "connect", "spawn", "off")
PROBE_SETS = ("contended", "all")  # the probe sets of bpf/gil.bpf.c
DEFAULT_PROBE_SET = "contended"
# The one home of the probes' defaults: Options, the CLI and ProbeConfig use
# these; bpf/gil.bpf.c repeats them for compiling it alone (tests/test_probe_config.py).
DEFAULT_WAIT_THRESHOLD_MS = 1.0
DEFAULT_HOLD_THRESHOLD_MS = 50.0
DEFAULT_STACK_THRESHOLD_MS = 10.0  # holder stacks (otel_gil/stacks/store.py)
# 4 MiB: ~2 s of events at the 64-thread soak's rate, for a sidecar that
# shares a busy machine's CPUs (kernel memory, not RssAnon).
DEFAULT_RINGBUF_PAGES = 1024


@dataclass(frozen=True)
class Options:
    mode: str = "auto"
    socket: str = DEFAULT_SOCKET
    sidecar_python: str = ""
    wait_threshold_ms: float = DEFAULT_WAIT_THRESHOLD_MS
    hold_threshold_ms: float = DEFAULT_HOLD_THRESHOLD_MS
    stack_threshold_ms: float = DEFAULT_STACK_THRESHOLD_MS
    start_timeout_s: float = 30.0
    prometheus_port: int = 9464
    max_thread_labels: int = 20
    ringbuf_pages: int = DEFAULT_RINGBUF_PAGES
    probes: str = DEFAULT_PROBE_SET
    span_queue_mb: float = 8.0

    @property
    def socket_configured(self) -> bool:
        return bool(os.environ.get(OTEL_PYTHON_GIL_SOCKET))


ENV: Dict[str, str] = {
    "mode": OTEL_PYTHON_GIL_MODE,
    "socket": OTEL_PYTHON_GIL_SOCKET,
    "sidecar_python": OTEL_PYTHON_GIL_SIDECAR_PYTHON,
    "wait_threshold_ms": OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS,
    "hold_threshold_ms": OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS,
    "stack_threshold_ms": OTEL_PYTHON_GIL_STACK_THRESHOLD_MS,
    "start_timeout_s": OTEL_PYTHON_GIL_START_TIMEOUT_S,
    "prometheus_port": OTEL_PYTHON_GIL_PROMETHEUS_PORT,
    "max_thread_labels": OTEL_PYTHON_GIL_MAX_THREAD_LABELS,
    "ringbuf_pages": OTEL_PYTHON_GIL_RINGBUF_PAGES,
    "probes": OTEL_PYTHON_GIL_PROBES,
    "span_queue_mb": OTEL_PYTHON_GIL_SPAN_QUEUE_MB,
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
            value = type(getattr(Options, f.name))(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{ENV[f.name]}={raw!r} is not a valid {f.name}") from None
        if isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"{ENV[f.name]}={raw!r} must not be negative")
        values[f.name] = value
    opts = Options(**values)
    if opts.mode not in MODES:
        raise ValueError(f"{OTEL_PYTHON_GIL_MODE}={opts.mode!r}: use one of {', '.join(MODES)}")
    if opts.ringbuf_pages < 1 or opts.ringbuf_pages & (opts.ringbuf_pages - 1):
        # BPF_MAP_TYPE_RINGBUF: a power-of-two number of pages (kernel/bpf/ringbuf.c)
        raise ValueError(f"{OTEL_PYTHON_GIL_RINGBUF_PAGES}={opts.ringbuf_pages}: use a power "
                         "of two")
    if opts.probes not in PROBE_SETS:
        raise ValueError(f"{OTEL_PYTHON_GIL_PROBES}={opts.probes!r}: use one of "
                         f"{', '.join(PROBE_SETS)}")
    return opts


def markdown() -> str:
    defaults = Options()
    out = ["# Configuration", "",
           "Keyword arguments of `otel_gil.instrument()` win over the environment.",
           "Generated by `python -m otel_gil.config`.", "",
           "| keyword | environment variable | default | meaning |", "|---|---|---|---|"]
    for key, env in ENV.items():
        out.append(f"| `{key}` | `{env}` | `{getattr(defaults, key)!s}` | {DOCS[env]} |")
    out += ["", "The standard `OTEL_EXPORTER_OTLP_*` variables choose where the sidecar exports "
            "spans and metrics (gRPC by default, `http/protobuf` with "
            "`OTEL_EXPORTER_OTLP_PROTOCOL`). A spawned sidecar inherits the app's environment.",
            ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
