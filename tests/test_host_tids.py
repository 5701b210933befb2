"""otel_gil/probes/tids.py: ns tid -> our tid, and reused ns tids."""

from __future__ import annotations

from typing import Dict, List

from otel_gil.probes.tids import HostTids


class FakeProc:
    """A target's /proc/PID/task as NSpid pairs, with a count of reads."""

    def __init__(self, threads: Dict[int, int]) -> None:
        self.threads = dict(threads)
        self.reads: List[int] = []

    def __call__(self, pid: int) -> Dict[int, int]:
        self.reads.append(pid)
        return dict(self.threads)


def test_known_ns_tids_are_read_once_and_unknown_ones_kept() -> None:
    proc = FakeProc({1: 4001, 7: 4007})
    tids = HostTids(proc)
    assert tids.translate(50, 7) == 4007
    assert tids.translate(50, 1) == 4001
    assert proc.reads == [50]  # one read gave both
    assert tids.translate(50, 9) == 9  # not in /proc (exited before we looked): as it is
    assert proc.reads == [50, 50]


def test_a_reused_ns_tid_maps_to_the_new_thread_once_the_old_one_is_reaped() -> None:
    proc = FakeProc({7: 4007})
    tids = HostTids(proc)
    assert tids.translate(50, 7) == 4007
    # Thread 4007 exits; a new thread gets ns tid 7 in the target's namespace.
    proc.threads = {7: 5123}
    assert tids.translate(50, 7) == 4007  # still cached: the session has not reaped it
    tids.forget(50, [7])  # the session reaped its holder entry (Probes.forget_holders)
    assert tids.translate(50, 7) == 5123


def test_forgetting_one_process_keeps_the_others() -> None:
    proc = FakeProc({7: 4007})
    tids = HostTids(proc)
    tids.translate(50, 7)
    tids.translate(60, 7)
    tids.forget(50)
    tids.forget(60, [])  # nothing reaped: nothing changes
    proc.threads = {7: 9999}
    assert tids.translate(60, 7) == 4007
    assert tids.translate(50, 7) == 9999
