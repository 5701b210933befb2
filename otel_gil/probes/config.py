"""The probes' settings: thresholds, map sizes, probe set, and the program text
they compile (bpf/gil.bpf.c with its header). No bcc here: doctor and record
--dump-bpf use it without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, List

from otel_gil.config import (
    DEFAULT_HOLD_THRESHOLD_MS,
    DEFAULT_PROBE_SET,
    DEFAULT_RINGBUF_PAGES,
    DEFAULT_STACK_THRESHOLD_MS,
    DEFAULT_WAIT_THRESHOLD_MS,
    PROBE_SETS,
)
from otel_gil.target.procfs import own_pid_namespace

__all__ = ["DEFAULT_PROBE_SET", "PROBE_SETS", "ProbeConfig", "bpf_dir", "program_text"]


def _ns(ms: float) -> int:
    return int(ms * 1e6)


@dataclass(frozen=True)
class ProbeConfig:
    """The probes' compile-time settings (-D flags of bpf/gil.bpf.c, whose own
    fallbacks repeat these defaults: tests/test_probe_config.py)."""

    # waits/holds at or above these become events (otel_gil.config's defaults)
    wait_threshold_ns: int = _ns(DEFAULT_WAIT_THRESHOLD_MS)
    hold_threshold_ns: int = _ns(DEFAULT_HOLD_THRESHOLD_MS)
    max_threads: int = 8192
    max_targets: int = 256
    ringbuf_pages: int = DEFAULT_RINGBUF_PAGES
    empty: bool = False  # probes that return at once: the overhead floor (bench/)
    probes: str = DEFAULT_PROBE_SET  # "contended" or "all" (bpf/gil.bpf.c)
    # Holder stacks (otel_gil/stacks/store.py): a holder's stack is taken as it blocks
    # holding the GIL, or at a CPU sample once its hold lasted stack_threshold_ns;
    # waits at or above it carry their holders' stacks on spans.
    stacks: bool = True
    stack_threshold_ns: int = _ns(DEFAULT_STACK_THRESHOLD_MS)
    stack_sample_hz: int = 99  # CPU-clock samples per CPU (0: only blocked holders)

    def __post_init__(self) -> None:
        if self.probes not in PROBE_SETS:
            raise ValueError(f"unknown probe set {self.probes!r}: use one of "
                             f"{', '.join(PROBE_SETS)}")

    @classmethod
    def from_ms(cls, wait_threshold_ms: float, hold_threshold_ms: float,
                **settings: Any) -> ProbeConfig:
        """From thresholds in milliseconds, as the CLI and Options give them."""
        return cls(wait_threshold_ns=_ns(wait_threshold_ms),
                   hold_threshold_ns=_ns(hold_threshold_ms), **settings)

    def cflags(self) -> List[str]:
        flags = ["-DEMPTY_PROBES"] if self.empty else []
        if self.probes == "all":
            flags.append("-DPROBES_ALL")
        if not self.stacks:
            flags.append("-DNO_STACKS")
        pidns = own_pid_namespace()
        if pidns is not None:
            flags += [f"-DSIDECAR_PIDNS_DEV={pidns[0]}ULL", f"-DSIDECAR_PIDNS_INO={pidns[1]}ULL"]
        return flags + [
            f"-DWAIT_THRESHOLD_NS={self.wait_threshold_ns}ULL",
            f"-DHOLD_THRESHOLD_NS={self.hold_threshold_ns}ULL",
            f"-DSTACK_THRESHOLD_NS={self.stack_threshold_ns}ULL",
            f"-DMAX_THREADS={self.max_threads}",
            f"-DMAX_TARGETS={self.max_targets}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
        ]


def bpf_dir() -> Path:
    return Path(str(resources.files("otel_gil.bpf")))


def program_text(config: ProbeConfig) -> str:
    """The program exactly as compiled: the -D settings, the header, the source.
    Printed by ``otel-gil record --dump-bpf``."""
    src = bpf_dir()
    defines = "".join(f"#define {f[2:].replace('=', ' ', 1)}\n" for f in config.cflags())
    return defines + (src / "gil.h").read_text() + (src / "gil.bpf.c").read_text()
