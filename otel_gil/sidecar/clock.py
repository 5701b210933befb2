"""Converting kernel timestamps (CLOCK_MONOTONIC) to the app's wall clock.

``bpf_ktime_get_ns()`` is the host's CLOCK_MONOTONIC; OpenTelemetry stamps spans
with ``time.time_ns()`` (CLOCK_REALTIME). The offset between the two is
measured the way the OpenTelemetry eBPF profiler does: read REALTIME, MONOTONIC,
REALTIME several times and keep the triple with the narrowest REALTIME bracket.
Its half-width bounds the error of the offset. REALTIME can step (NTP, an admin)
and MONOTONIC stops in suspend, so :class:`Clock` re-measures periodically and
keeps every offset it saw, so that events from before a step convert with the
offset that held when they happened.

Every timestamp converted here is the kernel's (the host's CLOCK_MONOTONIC),
never one read inside a target, so a target in a time namespace (its own
CLOCK_MONOTONIC shifted, Linux 5.6+) needs no correction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

ClockFn = Callable[[], int]


@dataclass(frozen=True)
class ClockOffset:
    """realtime = monotonic + offset_ns, within +- uncertainty_ns."""

    offset_ns: int
    uncertainty_ns: int
    measured_at_mono_ns: int

    def to_realtime(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns


def _realtime() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def _monotonic() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def calibrate(samples: int = 16, realtime: ClockFn = _realtime,
              monotonic: ClockFn = _monotonic) -> ClockOffset:
    """Min-bracket calibration over ``samples`` (realtime, monotonic, realtime) triples.

    offset = midpoint of the realtime bracket - monotonic; uncertainty = half
    the bracket (the monotonic read happened somewhere inside it). A bracket of
    0 ns (a coarse clock) is reported as 1 ns: the truth is never known exactly."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    best: ClockOffset | None = None
    best_width = 0
    for _ in range(samples):
        before = realtime()
        mono = monotonic()
        after = realtime()
        width = after - before
        if width < 0:  # REALTIME stepped back inside the bracket: useless sample
            continue
        if best is None or width < best_width:
            best_width = width
            # floor of the midpoint, computed without overflow-style surprises
            best = ClockOffset(before + width // 2 - mono, max(1, (width + 1) // 2), mono)
    if best is None:
        raise RuntimeError("REALTIME went backwards in every sample")
    return best


class Clock:
    """A calibrated offset, refreshed on demand, remembering steps.

    ``history`` holds every offset that differed from its predecessor by more
    than their combined uncertainty (a step), oldest first; ``to_realtime``
    uses the newest one measured at or before the given monotonic time. A step
    is only seen at the next refresh, so events between the step and that
    refresh still convert with the old offset: refresh often enough (the
    sidecar does every few seconds) for that window to be small."""

    def __init__(self, samples: int = 16, realtime: ClockFn = _realtime,
                 monotonic: ClockFn = _monotonic) -> None:
        self._samples = samples
        self._realtime = realtime
        self._monotonic = monotonic
        self.history: list[ClockOffset] = [self._measure()]
        self.refreshed_at_mono_ns = self.history[0].measured_at_mono_ns
        self.steps = 0

    def _measure(self) -> ClockOffset:
        return calibrate(self._samples, self._realtime, self._monotonic)

    @property
    def current(self) -> ClockOffset:
        return self.history[-1]

    def refresh(self) -> bool:
        """Re-measure. True when the offset stepped; otherwise the measurement
        with the smaller uncertainty (or the newer, on a tie) replaces the last."""
        new = self._measure()
        self.refreshed_at_mono_ns = new.measured_at_mono_ns
        last = self.history[-1]
        if abs(new.offset_ns - last.offset_ns) > new.uncertainty_ns + last.uncertainty_ns:
            self.history.append(new)
            self.steps += 1
            return True
        if new.uncertainty_ns <= last.uncertainty_ns:
            # keep when the old offset began to apply: events before the refresh
            # are still after the step this entry stands for
            self.history[-1] = ClockOffset(new.offset_ns, new.uncertainty_ns,
                                           last.measured_at_mono_ns)
        return False

    def refresh_if_older_than(self, seconds: float) -> bool:
        """Refresh when the newest measurement is older than ``seconds``; True on a step."""
        if self._monotonic() - self.refreshed_at_mono_ns < seconds * 1e9:
            return False
        return self.refresh()

    def offset_at(self, mono_ns: int) -> ClockOffset:
        for offset in reversed(self.history):
            if offset.measured_at_mono_ns <= mono_ns:
                return offset
        return self.history[0]

    def to_realtime(self, mono_ns: int) -> int:
        return self.offset_at(mono_ns).to_realtime(mono_ns)
