"""Pure timeline maths: histogram buckets, percentiles, and who held the GIL
during a wait. No BCC, no I/O: unit-tested in tests/test_timeline.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

from otel_gil.abi.events import GIL_HIST_BUCKETS, GIL_HIST_MIN_SHIFT, Interval


def bucket_of(ns: int) -> int:
    """The histogram bucket of a duration; the same function as bucket_of() in
    bpf/gil.bpf.c: bucket 0 below 2^MIN_SHIFT ns, then 4 buckets per power of two."""
    if ns < (1 << GIL_HIST_MIN_SHIFT):
        return 0
    e = ns.bit_length() - 1
    sub = (ns >> (e - 2)) & 3
    return min(1 + (e - GIL_HIST_MIN_SHIFT) * 4 + sub, GIL_HIST_BUCKETS - 1)


def bucket_bounds(b: int) -> Tuple[int, int]:
    """[low, high) in ns of bucket b (the last bucket is open-ended: high is its low x 2)."""
    if b == 0:
        return 0, 1 << GIL_HIST_MIN_SHIFT
    e, sub = divmod(b - 1, 4)
    e += GIL_HIST_MIN_SHIFT
    step = 1 << (e - 2)
    low = (1 << e) + sub * step
    return low, low + step


def percentile(hist: Sequence[int], q: float) -> int:
    """The q-quantile (0 < q <= 1) of a bucketed histogram, interpolated linearly
    inside its bucket. Returns 0 for an empty histogram."""
    total = sum(hist)
    if total == 0:
        return 0
    rank = q * total
    seen = 0
    for b, count in enumerate(hist):
        if count and seen + count >= rank:
            low, high = bucket_bounds(b)
            return int(low + (high - low) * max(0.0, rank - seen) / count)
        seen += count
    return bucket_bounds(len(hist) - 1)[0]


def merge(hists: Iterable[Sequence[int]]) -> List[int]:
    out = [0] * GIL_HIST_BUCKETS
    for h in hists:
        for i, v in enumerate(h):
            out[i] += v
    return out


@dataclass(frozen=True)
class Blame:
    """One thread's share of the GIL during someone else's wait."""

    tid: int
    held_ns: int  # overlap of its holds with the wait


def blame(wait: Interval) -> List[Blame]:
    """Who held the GIL during a wait, and for how long within it, longest first.

    The probes attach the holds that overlapped the wait (newest first, up to
    GIL_MAX_HOLDERS); a thread may appear several times. Overlap, not whole
    holds: a holder that took the GIL long before the wait began is charged
    only from the wait's start."""
    held: Dict[int, int] = {}
    for h in wait.holds:
        overlap = min(h.end_ns, wait.end_ns) - max(h.start_ns, wait.start_ns)
        if overlap > 0 and h.tid != wait.tid:
            held[h.tid] = held.get(h.tid, 0) + overlap
    return sorted((Blame(t, ns) for t, ns in held.items()), key=lambda b: (-b.held_ns, b.tid))


def holds_truncated(wait: Interval) -> bool:
    """True when more hand-offs happened during the wait than the event carries."""
    return wait.holds_total > len(wait.holds)
