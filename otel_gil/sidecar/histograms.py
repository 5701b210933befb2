"""Wait and hold duration histograms built from the kernel's per-thread histograms.

The probes keep, per thread, a histogram of every wait and every hold (struct
thread_stats in bpf/gil.h: 4 buckets per power of two from 64 ns), so the
exported histograms cover every acquisition, not only the intervals above the
span thresholds. They are folded onto EDGES_NS, a 1-2-5 series from ~1 µs to
~10 s, each chosen among the kernel's own bucket edges so that the fold is
exact: a kernel bucket never straddles an exported boundary. An edge is within
8% of its round value (1 ms is 1.048576 ms). The kernel's buckets are
[low, high) where OpenTelemetry's are (low, high]: a duration exactly on an
edge (to the nanosecond) is counted one bucket up.

Exemplars: the waits and holds that became spans, the latest per exported
bucket since the reader's previous collection, pointing at their span.

A kind the kernel keeps no histogram for (a probe set without per-transition
holds) falls back to the intervals the probes sent one by one (ThreadTotals
gives None for it): then that histogram holds only the intervals at or above
the threshold. Pure logic, no SDK state: unit-tested in tests/test_pipeline.py.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from otel_gil.abi.buckets import bucket_bounds
from otel_gil.abi.events import GIL_HIST_BUCKETS

EDGES_NS: Tuple[int, ...] = (
    1 << 10, 1 << 11, 5 << 10, 5 << 11, 5 << 12,  # 1, 2, 5, 10, 20 µs
    3 << 14, 3 << 15, 3 << 16,  # 50, 100, 200 µs
    1 << 19, 1 << 20, 1 << 21, 5 << 20, 5 << 21, 5 << 22,  # 0.5, 1, 2, 5, 10, 20 ms
    3 << 24, 3 << 25, 3 << 26,  # 50, 100, 200 ms
    7 << 26, 7 << 27, 7 << 28,  # 0.5, 1, 2 s
    5 << 30, 5 << 31,  # 5, 10 s
)
BOUNDARIES_S: Tuple[float, ...] = tuple(e / 1e9 for e in EDGES_NS)
# FOLD[b]: the exported bucket of kernel bucket b.
FOLD: Tuple[int, ...] = tuple(bisect_right(EDGES_NS, bucket_bounds(b)[0])
                              for b in range(GIL_HIST_BUCKETS))

Labels = Tuple[Tuple[str, Any], ...]


@dataclass(frozen=True)
class Exemplar:
    time_unix_nano: int
    value_ns: int
    trace_id: int
    span_id: int


@dataclass
class LabelHistogram:
    """Cumulative counts of one series (one label set of one kind)."""

    counts: List[int] = field(default_factory=lambda: [0] * (len(EDGES_NS) + 1))
    sum_ns: int = 0
    max_ns: int = 0
    exemplars: Dict[int, Exemplar] = field(default_factory=dict)  # exported bucket -> latest

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add_kernel_delta(self, delta: Sequence[int], delta_sum_ns: int) -> None:
        for b, n in enumerate(delta):
            if n:
                self.counts[FOLD[b]] += n
        self.sum_ns += delta_sum_ns

    def add_value(self, ns: int) -> None:
        self.counts[bisect_right(EDGES_NS, ns)] += 1
        self.sum_ns += ns
        self.max_ns = max(self.max_ns, ns)

    def offer(self, ex: Exemplar) -> None:
        self.exemplars[bisect_right(EDGES_NS, ex.value_ns)] = ex


@dataclass
class Snapshot:
    """A series as one reader last saw it (for delta temporality)."""

    counts: Tuple[int, ...]
    sum_ns: int
    time_unix_nano: int


class HistogramSet:
    """The histograms of one kind ("wait" or "hold"), per label set."""

    def __init__(self) -> None:
        self.series: Dict[Labels, LabelHistogram] = {}
        self._last: Dict[int, Tuple[Tuple[int, ...], int]] = {}  # tid -> (kernel hist, total)

    def fold_thread(self, tid: int, labels: Labels, hist: Optional[Sequence[int]],
                    total_ns: int, max_ns: int) -> None:
        """Add what a thread's kernel histogram gained since last time."""
        if hist is None:
            return
        now = tuple(hist)
        last = self._last.get(tid)
        if last is not None and last[0] == now:
            return
        if last is None or any(n < o for n, o in zip(now, last[0])):
            last = ((0,) * len(now), 0)  # first sighting, or a new thread reusing the tid
        series = self.series.setdefault(labels, LabelHistogram())
        series.add_kernel_delta([n - o for n, o in zip(now, last[0])], total_ns - last[1])
        series.max_ns = max(series.max_ns, max_ns)
        self._last[tid] = (now, total_ns)

    def record_event(self, labels: Labels, ns: int, exemplar: Optional[Exemplar],
                     from_kernel: bool) -> None:
        """An interval the probes sent: its exemplar, and its value when the
        kernel keeps no histogram of this kind."""
        if not from_kernel:
            self.series.setdefault(labels, LabelHistogram()).add_value(ns)
        if exemplar is not None:
            self.series.setdefault(labels, LabelHistogram()).offer(exemplar)

    def forget_threads(self, tids: Sequence[int]) -> None:
        for tid in tids:
            self._last.pop(tid, None)


def delta(series: LabelHistogram, last: Optional[Snapshot]) -> Tuple[List[int], int]:
    """Counts and sum gained since a snapshot (everything when there is none)."""
    if last is None:
        return list(series.counts), series.sum_ns
    return ([n - o for n, o in zip(series.counts, last.counts)], series.sum_ns - last.sum_ns)
