"""otel_gil/probes/tids.py: ns tid -> our tid, and reused ns tids."""

from __future__ import annotations

from typing import Dict, FrozenSet, List

from otel_gil.probes.tids import HostTids


class FakeProc:
    """A target's /proc/PID/task: its ns tid -> our tid pairs, with a count
    of status reads (one per pid: every thread's) and of listings."""

    def __init__(self, threads: Dict[int, int]) -> None:
        self.threads = dict(threads)
        self.reads: List[int] = []
        self.listings = 0

    def __call__(self, pid: int) -> Dict[int, int]:
        self.reads.append(pid)
        return dict(self.threads)

    def list_tasks(self, pid: int) -> FrozenSet[int]:
        self.listings += 1
        return frozenset(self.threads.values())


def _tids(proc: FakeProc) -> HostTids:
    return HostTids(proc, proc.list_tasks)


def test_known_ns_tids_are_read_once_and_unknown_ones_kept() -> None:
    proc = FakeProc({1: 4001, 7: 4007})
    tids = _tids(proc)
    assert tids.translate(50, 7) == 4007
    assert tids.translate(50, 1) == 4001
    assert proc.reads == [50]  # one read gave both
    assert tids.translate(50, 9) == 9  # not in /proc (exited before we looked): as it is
    assert proc.reads == [50]  # the same threads as at the read: no status says more
    proc.threads[9] = 4009  # a thread starts
    assert tids.translate(50, 9) == 4009
    assert proc.reads == [50, 50]


def test_made_up_ns_tids_cost_a_listing_each_not_every_status() -> None:
    """The ns tid is read from the target's memory: a hostile one may send
    any number, each time another. While its threads stay the same, no
    status file is read again."""
    proc = FakeProc({n: 4000 + n for n in range(1, 65)})
    tids = _tids(proc)
    assert [tids.translate(50, 100_000 + n) for n in range(500)] == \
        [100_000 + n for n in range(500)]
    assert proc.reads == [50]
    assert proc.listings == 500
    assert tids.translate(50, 64) == 4064  # the real ones still resolve


def test_a_reused_ns_tid_maps_to_the_new_thread_once_the_old_one_is_reaped() -> None:
    proc = FakeProc({7: 4007})
    tids = _tids(proc)
    assert tids.translate(50, 7) == 4007
    # Thread 4007 exits; a new thread gets ns tid 7 in the target's namespace.
    proc.threads = {7: 5123}
    assert tids.translate(50, 7) == 4007  # still cached: the session has not reaped it
    tids.forget(50, [7])  # the session reaped its holder entry (Probes.forget_holders)
    assert tids.translate(50, 7) == 5123
    proc.threads = {7: 5123}
    tids.forget(50, [7])  # a mapping forgotten while its thread lives: read again
    assert tids.translate(50, 7) == 5123
    assert proc.reads == [50, 50, 50]


def test_forgetting_one_process_keeps_the_others() -> None:
    proc = FakeProc({7: 4007})
    tids = _tids(proc)
    tids.translate(50, 7)
    tids.translate(60, 7)
    tids.forget(50)
    tids.forget(60, [])  # nothing reaped: nothing changes
    proc.threads = {7: 9999}
    assert tids.translate(60, 7) == 4007
    assert tids.translate(50, 7) == 9999
