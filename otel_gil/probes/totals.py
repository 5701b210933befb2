"""One traced thread's totals, as the session keeps them: copied from the
kernel's per-thread entry (struct thread_stats) and, with the contended set,
its holder totals (holder_totals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from otel_gil.abi import buckets, events


@dataclass
class ThreadTotals:
    """Everything known about one traced thread (host tid)."""

    tid: int
    pid: int
    ns_tid: int = 0  # tid in the target's own PID namespace
    name: str = "?"
    acquisitions: int = 0
    wait_ns: int = 0
    hold_ns: int = 0
    max_wait_ns: int = 0
    max_hold_ns: int = 0
    unmatched: int = 0
    waits: int = 0  # waits ended (both sets count them alike)
    timed_waits: int = 0  # timed waits on gil->cond begun
    take_ns: int = 0  # all set: from finding the GIL free to holding it
    holds: int = 0  # contended set: holds seen while another thread waited
    exited: bool = False
    # None: the probe set keeps no such histogram (see Session.histogram_kinds)
    wait_hist: Optional[List[int]] = None
    hold_hist: Optional[List[int]] = None

    def update(self, raw: events.ThreadStats, contended: bool = False) -> None:
        """Copy what the kernel's struct has; a probe set may keep fewer fields.
        With the contended set, hold times come from update_holds instead."""
        for name in _TOTALS:
            if not (contended and name in _HOLD_TOTALS):
                setattr(self, name, int(getattr(raw, name, 0)))
        self.exited = bool(raw.exited)
        for name in _HISTOGRAMS:
            if contended and name == "hold_hist":
                continue
            hist = getattr(raw, name, None)
            setattr(self, name, None if hist is None else list(hist))

    def update_holds(self, raw: events.HolderStats) -> None:
        """Contended set: the time this thread held the GIL while another waited.
        Never less than read before: a slot moved to the map between the two
        reads of holder_totals is missing from that read, not gone."""
        self.hold_ns = max(self.hold_ns, int(raw.hold_ns))
        self.max_hold_ns = max(self.max_hold_ns, int(raw.max_hold_ns))
        self.holds = max(self.holds, int(raw.holds))

    @property
    def p99_wait_ns(self) -> int:
        return buckets.percentile(self.wait_hist or [], 0.99)


HolderKey = Tuple[int, int]  # (pid, tid in the target's PID namespace)


def holder_totals(entries: Iterable[events.HolderStats],
                  states: Dict[int, events.TargetState]) -> Dict[HolderKey, events.HolderStats]:
    """Contended set: each holder's totals, by (pid, ns tid): its entry in the
    holders map plus its slot in its target (struct holder_slot). The map is
    read first: a slot the kernel moves to the map in between is missed once
    (update_holds keeps the last total), never counted twice."""
    out = {(int(e.pid), int(e.ns_tid)): events.HolderStats.from_buffer_copy(e) for e in entries}
    for pid, state in states.items():
        for slot in state.held:
            if not slot.ns_tid or not slot.holds:
                continue
            key = (pid, int(slot.ns_tid))
            got = out.setdefault(key, events.HolderStats(pid=pid, ns_tid=int(slot.ns_tid)))
            got.hold_ns += slot.hold_ns
            got.holds += slot.holds
            got.max_hold_ns = max(got.max_hold_ns, slot.max_hold_ns)
    return out


_TOTALS = ("acquisitions", "wait_ns", "hold_ns", "max_wait_ns", "max_hold_ns", "unmatched",
           "waits", "timed_waits", "take_ns")
_HOLD_TOTALS = ("hold_ns", "max_hold_ns")  # the contended set's come from its holder map
_HISTOGRAMS = ("wait_hist", "hold_hist")
