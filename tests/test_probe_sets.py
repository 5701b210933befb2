"""The two probe sets against each other, on real probes and every interpreter.

`contended` sees only what runs when a thread must wait; `all` sees every
acquisition and release. Both are attached to the same child at once (two BPF
programs on the same uprobes coexist), so they measure the very same run:

- on 4 CPU-bound threads they must agree: per-thread wait totals within 2%,
  the same waits of 1 ms or more with start and end within 20 µs, the same
  hand-off and forced-switch counts;
- on one thread that releases the GIL a million times, `contended` must not
  fire a single probe (counted by a separate program on the same sites).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
from independent_counter import HitCounter
from targets import PythonTarget, all_targets, require, spawn

from otel_gil.abi.events import Interval
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.points import PROBE_FUNCTIONS, Point, in_attach_order, plan
from otel_gil.probes.session import Session

BURNERS = r"""
import json, os, sys, threading, time
def burn():
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        sum(i * i for i in range(100))
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=burn) for _ in range(4)]
for t in threads: t.start()
time.sleep(1.0)
print(json.dumps({"halfway": True}), flush=True)
for t in threads: t.join()
print(json.dumps({"done": True}), flush=True)
sys.stdin.readline()
"""

HASH_LOOP = r"""
import json, sys, time
# time.sleep(0) drops and re-takes the GIL on every call, in every version
# (hashlib.sha1 of 2 KiB no longer does in 3.15: seen on sid's 3.15.2)
print(json.dumps({"ready": True}), flush=True)
n = int(sys.stdin.readline())
for _ in range(n):
    time.sleep(0)
print(json.dumps({"done": n}), flush=True)
sys.stdin.readline()
"""

MATCH_NS = 20_000  # start and end of the same wait, as the two sets time it
# Both sets time a wait at the same probe hits, each program reading the clock
# as it starts, one after the other. Between the two, the thread can lose its
# CPU (uprobe programs run preemptible) and, in a VM, the vCPU its host CPU
# (steal time): on a loaded machine a few pairs are further apart, by up to a
# scheduler slice of whatever ran meanwhile (1.7 and 2.0 ms seen in CI, the
# counts and totals still equal). Every wait must pair within PAIR_NS, and all
# but OUTLIERS of them within MATCH_NS.
PAIR_NS = 10_000_000
OUTLIERS = 0.05


def _step_until(sessions: List[Session], child_line: object) -> Dict[str, object]:
    while True:
        for s in sessions:
            s.step(20)
        try:
            return child_line.read_json(timeout=0.01)  # type: ignore[attr-defined]
        except TimeoutError:
            continue


def _waits(session: Session, threshold: int) -> List[Tuple[int, int, int]]:
    return sorted((iv.tid, iv.start_ns, iv.end_ns) for iv in session.intervals
                  if iv.kind == "wait" and iv.duration_ns >= threshold)


def _unmatched(a: List[Tuple[int, int, int]], b: List[Tuple[int, int, int]],
               within: int) -> List[object]:
    """Waits of a with no wait of b on the same thread within `within` at both ends."""
    missing = []
    for tid, start, end in a:
        if not any(t == tid and abs(s - start) <= within and abs(e - end) <= within
                   for t, s, e in b):
            missing.append((tid, start, end))
    return missing


@pytest.mark.ebpf
@pytest.mark.parametrize("target", [t for t in all_targets() if t.expect_gil],
                         ids=lambda t: t.name)
def test_contended_and_all_agree_on_cpu_bound_threads(target: PythonTarget) -> None:
    require(target)
    # GIVEN a child with 4 CPU-bound threads, traced by both probe sets at once
    child = spawn(target, BURNERS)
    sessions = {}
    try:
        child.read_json(timeout=60)
        for probes in ("contended", "all"):
            sessions[probes] = Session(ProbeConfig(probes=probes))
            sessions[probes].add(child.host_pid)
        # WHEN the threads burn for 2 s and the sets are detached while it lives
        child.send("go")
        _step_until(list(sessions.values()), child)  # halfway: the burners live
        for s in sessions.values():
            s.refresh()
        halfway = {p: {tid: t.hold_ns for tid, t in s.threads.items()}
                   for p, s in sessions.items()}
        _step_until(list(sessions.values()), child)
        for s in sessions.values():
            s.detach(child.host_pid)
    finally:
        for s in sessions.values():
            s.close()
        child.close()
    cont, every = sessions["contended"], sessions["all"]
    # THEN every thread's wait total agrees within 2%
    waited = {tid: t.wait_ns for tid, t in every.threads.items() if t.wait_ns}
    assert len(waited) >= 4, waited
    for tid, ns in waited.items():
        assert abs(cont.threads[tid].wait_ns - ns) <= 0.02 * ns, (tid, cont.threads[tid], ns)
        assert cont.threads[tid].waits == every.threads[tid].waits
    # AND the same waits of 1 ms or more, start and end within 20 µs
    w_cont, w_all = _waits(cont, 1_000_000), _waits(every, 1_000_000)
    assert len(w_all) > 20
    states = [s.targets[child.host_pid].state for s in (cont, every)]
    skipped = (cont.skipped_runs, every.skipped_runs,
               [(st.read_errors, st.torn_reads) for st in states if st is not None])
    # (a wait within MATCH_NS of the threshold can fall on either side of it in
    # each set: their programs read the clock a few µs apart; every wait is
    # counted alike, asserted above, and each one over it must have its pair)
    near = [w for w in w_cont + w_all if w[2] - w[1] < 1_000_000 + MATCH_NS]
    assert abs(len(w_cont) - len(w_all)) <= len(near), (len(w_cont), len(w_all), skipped)
    pool_c, pool_a = _waits(cont, 1_000_000 - MATCH_NS), _waits(every, 1_000_000 - MATCH_NS)
    lone = _unmatched(w_cont, pool_a, PAIR_NS) + _unmatched(w_all, pool_c, PAIR_NS)
    assert not lone, (lone, [w for w in w_cont + w_all if w[0] == lone[0][0]
                             and abs(w[1] - lone[0][1]) < 50_000_000], skipped)
    apart = _unmatched(w_cont, pool_a, MATCH_NS)
    assert len(apart) <= OUTLIERS * len(w_all), (len(apart), len(w_all), apart[:5])
    # AND the same hand-offs (contended: CPython's switch_number; all: counted
    # at each acquisition) and the same forced switches
    info_c, info_a = cont.targets[child.host_pid], every.targets[child.host_pid]
    assert info_c.state is not None and info_a.state is not None
    assert info_a.state.handoffs > 20
    assert info_c.state.handoffs == info_a.state.handoffs
    assert info_c.state.forced_switches == info_a.state.forced_switches
    # AND the holders the contended set saw are the ones the all set timed
    _check_holders(cont.intervals, every.intervals)
    # AND halfway, while the burners lived, as at the end once they exited,
    # their hold totals per the contended set (its holder map plus the totals
    # kept in place, struct holder_slot) are most of those the all set timed:
    # 4 burners always have a waiter, and only the first hold of each went
    # through the map
    for when in ("halfway", "end"):
        held = halfway if when == "halfway" else {
            p: {tid: t.hold_ns for tid, t in s.threads.items()} for p, s in sessions.items()}
        burners = [tid for tid in waited if held["all"].get(tid, 0) > 100_000_000]
        assert len(burners) >= 4, (when, held)
        for tid in burners:
            assert held["contended"].get(tid, 0) >= 0.5 * held["all"][tid], (when, tid, held)
    assert cont.lost_events() == 0 and every.lost_events() == 0


def _check_holders(cont: List[Interval], every: List[Interval]) -> None:
    """Each long wait's holders per the contended set: only threads that did
    hold (per the all set), and every thread that held 1 ms or more of it; and
    over all those waits, at most 10% of the time held given to another
    thread than the all set timed.

    The contended set learns of a hold at a waiter's wake-up: a thread that
    took the GIL unseen and let go before the next wake-up (the main thread
    between two joins) is not seen, its time counted to the hold seen before.
    And a seen hold ends when the next holder's wake-up runs: where that thread
    waits for a CPU (a busy machine), the GIL is free meanwhile and that time is
    counted to the previous holder too, so it may be more."""
    compared = waited = misplaced = 0
    for c in (iv for iv in cont if iv.kind == "wait" and iv.duration_ns >= 5_000_000):
        a = next((iv for iv in every if iv.kind == "wait" and iv.tid == c.tid
                  and abs(iv.start_ns - c.start_ns) <= MATCH_NS), None)
        if a is None or len(a.holds) >= 16 or len(c.holds) >= 16:
            continue  # truncated: more hand-offs than one event carries
        compared += 1
        held_c, held_a = _held_within(c), _held_within(a)
        long_a = {tid for tid, ns in held_a.items() if ns >= 1_000_000}
        assert long_a <= set(held_c) <= set(held_a), (c, a)
        assert sum(held_c.values()) <= c.duration_ns
        waited += c.duration_ns
        misplaced += sum(max(0, ns - held_c.get(tid, 0)) for tid, ns in held_a.items())
    assert compared > 10
    assert misplaced <= 0.1 * waited, (misplaced, waited)


def _held_within(wait: Interval) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for h in wait.holds:
        ns = min(h.end_ns, wait.end_ns) - max(h.start_ns, wait.start_ns)
        if ns > 0:
            out[h.tid] = out.get(h.tid, 0) + ns
    return out


@pytest.mark.parametrize("probe_set", list(PROBE_FUNCTIONS))
def test_what_ends_an_interval_is_attached_before_what_begins_one(probe_set: str) -> None:
    # GIVEN a set's programs, listed starts first, as plan() lists them
    starts, ends = {"on_wait", "on_take_gil"}, {"on_wake", "on_held", "on_release"}
    names = [n for n in PROBE_FUNCTIONS[probe_set] if n in starts] + \
            [n for n in PROBE_FUNCTIONS[probe_set] if n in ends]
    points = [Point(n, "/lib/x", 0x1000 + i, "r", "f", "i", "c") for i, n in enumerate(names)]
    # WHEN they are put in attach order
    order = [p.fn_name for p in in_attach_order(points)]
    # THEN every end comes before every start (a wait whose start was seen
    # cannot miss its end while the uprobes go live one by one)
    assert sorted(order) == sorted(names)
    last_end = max(i for i, n in enumerate(order) if n in ends)
    assert all(i > last_end for i, n in enumerate(order) if n in starts), order


@pytest.mark.ebpf
@pytest.mark.parametrize("target", [t for t in all_targets() if t.expect_gil],
                         ids=lambda t: t.name)
def test_contended_fires_no_probe_on_an_uncontended_loop(target: PythonTarget) -> None:
    require(target)
    calls = 20_000  # ~100 µs each: sleep(0) still pays the timer slack
    # GIVEN one thread that drops and re-takes the GIL on every call (sleep(0)),
    # traced with the contended set, and a separate counter on every site of
    # both sets (the all set's sites show that the loop does hand-offs)
    child = spawn(target, HASH_LOOP)
    try:
        child.read_json(timeout=60)
        session = Session(ProbeConfig(probes="contended"))
        try:
            tgt = session.add(child.host_pid)
            contended = [p for p in plan(tgt, "contended")]
            held = [p for p in plan(tgt, "all") if p.role == "held"]
            on_contended = HitCounter(child.host_pid, contended[0].path,
                                      [p.address for p in contended])
            on_held = HitCounter(child.host_pid, held[0].path, [p.address for p in held])
            try:
                # WHEN it makes 20 000 calls
                child.send(str(calls))
                _step_until([session], child)
                # THEN the contended sites were never hit, nor its programs run
                assert on_contended.total == 0
                assert sum(t.timed_waits for t in session.threads.values()) == 0
                # AND the loop did take the GIL once per call
                assert on_held.total >= calls
            finally:
                on_contended.close()
                on_held.close()
        finally:
            session.close()
    finally:
        child.close()


def test_holder_totals_add_each_holders_slot_to_its_map_entry() -> None:
    from otel_gil.abi import events
    from otel_gil.probes.totals import ThreadTotals, holder_totals
    # GIVEN map entries for two holders of pid 7, and pid 7's slots: one of
    # holder 11's, one of a holder with no entry yet (13), a free one and a
    # taken one still empty (a thread that took its slot, then held no more)
    entries = [events.HolderStats(pid=7, ns_tid=11, hold_ns=100, holds=2, max_hold_ns=60),
               events.HolderStats(pid=7, ns_tid=12, hold_ns=50, holds=1, max_hold_ns=50)]
    state = events.TargetState()
    state.held[11] = events.HolderSlot(ns_tid=11, hold_ns=30, holds=3, max_hold_ns=90)
    state.held[13] = events.HolderSlot(ns_tid=13, hold_ns=8, holds=1, max_hold_ns=8)
    state.held[5] = events.HolderSlot(ns_tid=0, hold_ns=4, holds=1, max_hold_ns=4)
    state.held[12] = events.HolderSlot(ns_tid=28, hold_ns=0, holds=0, max_hold_ns=0)
    # WHEN they are merged
    got = holder_totals(entries, {7: state})
    # THEN each holder's totals are its entry plus its slot, the entries untouched
    as_tuples = {k: (v.hold_ns, v.holds, v.max_hold_ns) for k, v in got.items()}
    assert as_tuples == {(7, 11): (130, 5, 90), (7, 12): (50, 1, 50), (7, 13): (8, 1, 8)}
    assert entries[0].hold_ns == 100
    # AND a thread's totals never go back (a slot moved to the map between
    # the two reads is missed by that read only)
    totals = ThreadTotals(tid=11, pid=7)
    totals.update_holds(got[(7, 11)])
    totals.update_holds(entries[0])
    assert (totals.hold_ns, totals.holds, totals.max_hold_ns) == (130, 5, 90)
