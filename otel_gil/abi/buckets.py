"""The kernel's duration histograms (struct thread_stats's wait_hist/hold_hist
in bpf/gil.h): bucket 0 below 2^GIL_HIST_MIN_SHIFT ns, then 4 buckets per power
of two, GIL_HIST_BUCKETS in all. Pure maths, unit-tested in tests/test_timeline.py.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

from otel_gil.abi.events import GIL_HIST_BUCKETS, GIL_HIST_MIN_SHIFT


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
