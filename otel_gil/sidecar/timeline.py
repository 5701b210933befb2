"""Who held the GIL during a wait, and for how long within it: the one place
the overlap of holds with a wait is worked out (spans, metrics exemplars and
`otel-gil record` all use it). No BCC, no I/O: unit-tested in tests/test_timeline.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from otel_gil.abi.events import Interval


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
    return [Blame(tid, ns) for tid, ns in holders_of(wait)[0]]


def holds_truncated(wait: Interval) -> bool:
    """True when more hand-offs happened during the wait than the event carries."""
    return wait.holds_total > len(wait.holds)


def holders_of(iv: Interval) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int, int]]]:
    """Who held the GIL during a wait, in one pass over its holds: (tid, held ns)
    longest first, as blame(); and one (trace id, span id, held ns) per
    distinct sampled span a holder was in, longest first (the links). Overlap
    with the wait, not whole holds; the waiter's own holds do not count.
    (Written for speed: it runs for every wait, over up to 16 holds.)"""
    by_tid: Dict[int, int] = {}
    by_span: Dict[Tuple[int, int], int] = {}
    me, w_start, w_end = iv.tid, iv.start_ns, iv.end_ns
    for tid, start, end, span, _seen in iv.holds:
        if tid == me:
            continue
        overlap = (end if end < w_end else w_end) - (start if start > w_start else w_start)
        if overlap <= 0:
            continue
        by_tid[tid] = by_tid.get(tid, 0) + overlap
        if span is not None and span.trace_flags & 1:
            key = (span.trace_id, span.span_id)
            by_span[key] = by_span.get(key, 0) + overlap
    blame = sorted(by_tid.items(), key=lambda x: (-x[1], x[0]))
    links = [(t, s, ns) for (t, s), ns in sorted(by_span.items(), key=lambda x: -x[1])]
    return blame, links
