"""`record` on real interpreters: 4 CPU-bound threads contending for the GIL.

For every interpreter of the matrix (tests/targets.py), a child runs 4
CPU-bound threads once tracing is live; each reports its own CPU time
(time.thread_time_ns). Tracing must agree with that, and with an independent
count of take_gil entries, and lose nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import pytest
from independent_counter import TakeGilCounter
from perf_uprobe import harmless_counter, open_uprobe
from targets import Child, PythonTarget, all_targets, require, spawn

from otel_gil.errors import GilDisabledError
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.target.interpreter import inspect_binary

WORKLOAD = r"""
import json, os, sys, threading, time
def runnable_ns():
    # /proc/self/task/TID/schedstat: on-CPU ns, run-queue wait ns, timeslices
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[1])
def burn(out, queued):
    t0, q0 = time.thread_time_ns(), runnable_ns()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        sum(i * i for i in range(100))
    out[threading.get_native_id()] = time.thread_time_ns() - t0
    queued[threading.get_native_id()] = runnable_ns() - q0
print(json.dumps({"pid": os.getpid(), "ready": True}), flush=True)
sys.stdin.readline()
out, queued = {}, {}
threads = [threading.Thread(target=burn, args=(out, queued)) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"cpu_ns": out, "runnable_ns": queued}), flush=True)
sys.stdin.readline()
"""

SWITCH_INTERVAL_NS = 5_000_000


def stolen_ns() -> int:
    """The host's steal time so far, all vCPUs (/proc/stat, USER_HZ ticks).
    Read here, not in the traced child: a file read there releases the GIL,
    a hand-off no drop request forced."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) * 10_000_000


def _trace_workload(target: PythonTarget, probes: str = "contended") -> tuple:
    child: Child = spawn(target, WORKLOAD)
    try:
        child.read_json(timeout=60)
        session = Session(ProbeConfig(probes=probes))
        session.add(child.host_pid)
        counter = TakeGilCounter(session.targets[child.host_pid].target)
        try:
            stolen = stolen_ns()
            child.send("go")
            result: Dict[str, Dict[str, int]] = {}
            while not result:
                session.step(50)
                try:
                    result = child.read_json(timeout=0.05)
                except TimeoutError:
                    continue
            stolen = stolen_ns() - stolen
            child.send("exit")
            child.popen.wait(timeout=30)
            while session.active:
                session.step(50)
            independent = counter.hits
        finally:
            counter.close()
            session.close()
    finally:
        child.close()
    cpu = {int(k): (v, result["runnable_ns"][k] + stolen) for k, v in result["cpu_ns"].items()}
    return session, cpu, independent


def assert_hold_matches_cpu(held: int, cpu_ns: int, runnable: int) -> None:
    """A CPU-bound thread holds the GIL whenever it runs, so its hold time is
    its CPU time (within 2%) on a quiet machine. On a busy one, a holder can
    also be preempted while holding (the GIL stays held): that time is in the
    thread's run-queue wait (schedstat), which bounds the excess from above.
    From below: a waiter also burns CPU without the GIL, waking every switch
    interval to look (its timed waits on gil->cond, and the probes on them),
    measured at 2-2.5% with the all set's sites on this 2-vCPU guest, and
    more on a loaded host: a probe's trap is a VM exit, and the host's delay
    in serving it is charged to the thread as CPU time outside its holds
    (0.86 seen once in CI, with the burner 11% of its time in the run queue).
    A missed hold or a misattributed one moves a thread's ratio far more, and
    the exact acquisition count is asserted separately. runnable includes the
    host's steal time over the workload (stolen_ns(): a vCPU the host preempts
    is neither CPU nor run-queue time, and its thread may hold the GIL), known
    to a tick (10 ms) per vCPU at each end: hence 40 ms more above."""
    assert held >= 0.85 * cpu_ns, (held, cpu_ns, runnable)
    assert held <= 1.02 * cpu_ns + runnable + 40_000_000, (held, cpu_ns, runnable)


@pytest.mark.ebpf
@pytest.mark.parametrize("probes", ["contended", "all"])
@pytest.mark.parametrize("target", [t for t in all_targets() if t.expect_gil],
                         ids=lambda t: t.name)
def test_four_cpu_bound_threads(target: PythonTarget, probes: str) -> None:
    require(target)
    # GIVEN a child of this interpreter, traced before its 4 threads start
    # WHEN the threads burn CPU for 1.5 s each and the child exits
    session, cpu, independent = _trace_workload(target, probes)
    info = next(iter(session.targets.values()))
    by_ns_tid = {t.ns_tid: t for t in session.threads.values()}
    acquired = sum(t.acquisitions for t in session.threads.values())
    if probes == "all":
        # THEN acquisitions equal the independent count of take_gil entries
        assert acquired == independent
    else:
        # THEN (contended) the acquisitions seen are those that ended a wait:
        # most of them, the burners being always contended (fewer on a machine
        # short of CPUs, where a burner may find the GIL free; the exact count
        # is the all set's, above)
        assert 0.5 * independent <= acquired <= independent, (acquired, independent)
    # (a probe run the kernel skipped would show up here: see Probes.skipped_runs)
    assert sum(t.unmatched for t in session.threads.values()) == 0, \
        (session.skipped_runs, [(t.tid, t.acquisitions, t.unmatched)
                                for t in session.threads.values()])
    # AND each burner's hold time is its own CPU time (2% under it on a quiet
    # host, up to 15% on a loaded one), plus at most the time it was preempted
    # (assert_hold_matches_cpu). Contended: only its
    # time held while another waited, which for 4 burners is most of it but not
    # while it ran alone (at the start, and after the others' 1.5 s ran out),
    # and each hold ends when the next holder's wake-up runs: so there only
    # that every burner is named as a holder for a good part of its CPU time;
    # tests/test_probe_sets.py compares the two sets on one run
    assert len(cpu) == 4
    for ns_tid, (cpu_ns, runnable) in cpu.items():
        held = by_ns_tid[ns_tid].hold_ns
        if probes == "all":
            # a hold starts once take_gil is done: the burner's CPU time also
            # covers take_gil from its wake-up on (take_ns), which under load
            # includes re-taking gil->mutex from a preempted thread
            assert_hold_matches_cpu(held + by_ns_tid[ns_tid].take_ns, cpu_ns, runnable)
        else:
            assert held >= 0.5 * cpu_ns, (ns_tid, held, cpu_ns)
    # AND the holds of all threads fit in the traced wall time
    wall = info.ended_ns - info.started_ns
    assert sum(t.hold_ns for t in session.threads.values()) <= wall
    # AND the waits show the switch-interval cluster: a CPU-bound holder only
    # lets go when a waiter's 5 ms timed wait expires and it asks for the GIL,
    # so waits are mostly one interval or more (in steps: with 3 others waiting,
    # the thread that timed out does not always win the race)
    burner_tids = {t.tid for t in session.threads.values() if t.ns_tid in cpu}
    waits = sorted(iv.duration_ns for iv in session.intervals
                   if iv.kind == "wait" and iv.tid in burner_tids)
    assert len(waits) > 20
    assert waits[len(waits) // 2] >= SWITCH_INTERVAL_NS
    assert any(SWITCH_INTERVAL_NS <= w < 1.5 * SWITCH_INTERVAL_NS for w in waits)
    # AND almost every hand-off was forced by a drop request
    assert info.state is not None
    assert info.state.forced_switches >= 0.8 * info.state.handoffs
    # AND nothing was lost
    assert session.lost_events() == 0, session.skipped_runs


@pytest.mark.ebpf
@pytest.mark.parametrize("target", [t for t in all_targets() if not t.expect_gil],
                         ids=lambda t: t.name)
def test_gil_disabled_is_refused(target: PythonTarget) -> None:
    require(target)
    child = spawn(target, WORKLOAD)
    try:
        child.read_json(timeout=60)
        session = Session(ProbeConfig())
        try:
            # PYTHON_GIL=0 (the target's env) keeps it off for good: no watching
            with pytest.raises(GilDisabledError,
                               match=r"^GIL disabled by PYTHON_GIL=0: nothing to measure "
                                     r"\(run with PYTHON_GIL=1 to measure the GIL\)$"):
                session.add(child.host_pid)
        finally:
            session.close()
    finally:
        child.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_gil", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["record", "--pid", "999999999"], "no process with pid 999999999"),
    (["record", "--pid", "abc"], "not a process id"),
    (["record"], "no target"),
])
def test_bad_input_is_one_clear_line(args: List[str], message: str) -> None:
    # GIVEN bad input WHEN record runs THEN one line names the problem, no traceback
    proc = _cli(*args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.ebpf
def test_record_of_non_python_process_is_refused() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        proc = _cli("record", "--pid", str(sleeper.pid))
        assert proc.returncode == 2
        assert "is not a Python process" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.ebpf
@pytest.mark.parametrize("probes", ["contended", "all"])
def test_record_cli_writes_documented_json(tmp_path, probes) -> None:  # type: ignore[no-untyped-def]
    # GIVEN the example app, started but waiting
    app = subprocess.Popen([sys.executable, "examples/contention.py", "--seconds", "1",
                            "--wait-for-go"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    assert app.stdout and app.stdin
    pid = json.loads(app.stdout.readline())["pid"]
    out = tmp_path / "record.json"
    rec = subprocess.Popen([sys.executable, "-m", "otel_gil", "record", "--pid", str(pid),
                            "--output", str(out), "--probes", probes], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        # WHEN the app starts its threads once record says it is tracing
        assert rec.stderr is not None
        assert f"tracing pid {pid}" in rec.stderr.readline()
        app.stdin.write("go\n")
        app.stdin.flush()
        stdout, _ = rec.communicate(timeout=60)
    finally:
        app.kill()
        app.wait()
    # THEN the table names the threads and the JSON has the documented fields
    assert rec.returncode == 0
    assert "burner-0" in stdout and "io" in stdout, stdout.splitlines()
    doc = json.loads(out.read_text())
    assert doc["schema"] == "otel-gil/record/v1"
    names = {t["name"] for t in doc["threads"]}
    assert {"burner-0", "burner-1", "burner-2", "burner-3", "io"} <= names
    for t in doc["threads"]:
        assert {"tid", "name", "acquisitions", "hold_ns", "wait_ns"} <= set(t)
    assert doc["wait_histogram"] and doc["lost_events"] == 0
    waits = [iv for iv in doc["intervals"] if iv["kind"] == "wait"]
    assert waits and all(iv["end_ns"] > iv["start_ns"] for iv in waits)
    assert any(iv["holders"] for iv in waits)
    proc = doc["processes"][0]
    assert proc["symbols"]["take_gil"] and proc["symbols"]["source"]
    # AND it says which probe set produced which number, and where each probe sat
    assert doc["probe_set"] == proc["probes"]["set"] == probes
    assert set(doc["numbers"]) >= {"waits", "holders", "handoffs", "forced_switches", "holds"}
    roles = {site["role"] for site in proc["probes"]["sites"]}
    assert all(site["handling"] == "emulated" for site in proc["probes"]["sites"])
    assert proc["handoffs"] > 0 and proc["forced_switches"] > 0
    if probes == "all":
        assert roles == {"wait", "wake", "held", "release"}
        assert proc["pid"] == pid and proc["release"]["fidelity"] == "exact"
    else:
        assert roles == {"wait", "wake"}
        assert proc["pid"] == pid and proc["release"]["fidelity"] == "none"
        assert "ACQUIRED*" in stdout and "HOLD%*" in stdout


LATE_WORKLOAD = r"""
import json, os, sys, threading, time
stop = False
def burn():
    while not stop:
        sum(i * i for i in range(100))
threads = [threading.Thread(target=burn) for _ in range(3)]
for t in threads: t.start()
print(json.dumps({"pid": os.getpid(), "ready": True}), flush=True)
sys.stdin.readline()
stop = True
for t in threads: t.join()
"""


def _trace(session: Session, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        session.step(50)


def _stop_and_drain(session: Session, child: Child) -> None:
    """Stop LATE_WORKLOAD's child, take the session's last events, close it."""
    child.send("stop")
    child.popen.wait(timeout=30)
    while session.active:
        session.step(50)
    session.close()


@pytest.mark.ebpf
def test_attach_to_a_running_process_with_the_gil_held() -> None:
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    # GIVEN a process whose threads already contend for the GIL
    child = spawn(target, LATE_WORKLOAD)
    try:
        child.read_json(timeout=60)
        session = Session(ProbeConfig(hold_threshold_ns=1_000_000))
        # WHEN we attach mid-flight, trace 1 s, then stop it. Attaching takes a
        # while (one probe after another): a wait that begins once the first
        # probe is live is a real, fully seen wait, so the bound is the moment
        # attaching began, not the moment it finished.
        attaching = time.monotonic_ns()
        session.add(child.host_pid)
        _trace(session, 1.0)
        _stop_and_drain(session, child)
    finally:
        child.close()
    # THEN nothing began before we attached: the wait or hold each thread was in
    # at attach is dropped (counted as unmatched), never reported as an interval
    assert session.intervals
    assert min(iv.start_ns for iv in session.intervals) >= attaching
    for t in session.threads.values():
        assert t.unmatched <= 1, (t.tid, t.unmatched)
    assert sum(t.acquisitions for t in session.threads.values()) > 10
    assert session.lost_events() == 0


@pytest.mark.ebpf
@pytest.mark.parametrize("probes", ["contended", "all"])
def test_a_target_detached_mid_wait_and_attached_again_gets_no_interval_across_the_gap(
        probes: str) -> None:
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    # GIVEN a process whose 3 threads contend: at any moment 2 of them wait
    child = spawn(target, LATE_WORKLOAD)
    try:
        child.read_json(timeout=60)
        session = Session(ProbeConfig(probes=probes, hold_threshold_ns=1_000_000))
        # WHEN it is traced, detached with waits in progress (as a sidecar does
        # when the app's connection drops), left alone for 1.5 s, then traced again
        session.add(child.host_pid)
        _trace(session, 0.5)
        session.detach(child.host_pid)
        time.sleep(1.5)
        again = time.monotonic_ns()
        session.add(child.host_pid)
        _trace(session, 1.0)
        _stop_and_drain(session, child)
    finally:
        child.close()
    # THEN no wait or hold of the second attach began before it: what the
    # threads were in at the detach was dropped and counted as unmatched
    later = [iv for iv in session.intervals if iv.end_ns >= again]
    assert later, "nothing traced after the second attach"
    early = [(iv.kind, iv.tid, (again - iv.start_ns) / 1e6) for iv in later
             if iv.start_ns < again]
    assert not early, early
    assert sum(t.unmatched for t in session.threads.values()) >= 1
    assert session.lost_events() == 0


@pytest.mark.ebpf
def test_record_stops_cleanly_on_sigint() -> None:
    import signal

    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    child = spawn(target, LATE_WORKLOAD)
    try:
        pid = child.read_json(timeout=60)["pid"]
        rec = subprocess.Popen([sys.executable, "-m", "otel_gil", "record", "--pid", str(pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert rec.stderr is not None
        assert f"tracing pid {pid}" in rec.stderr.readline()
        time.sleep(0.5)
        # WHEN record gets Ctrl-C
        rec.send_signal(signal.SIGINT)
        out, err = rec.communicate(timeout=30)
        # THEN it detaches, prints its table and exits 0; the target runs on
        assert rec.returncode == 0, err
        assert "ACQUIRED" in out and "Traceback" not in err
        assert child.popen.poll() is None
        child.send("stop")
        assert child.popen.wait(timeout=30) == 0
    finally:
        child.close()


@pytest.mark.ebpf
def test_another_tracers_uprobe_on_take_gil_is_named() -> None:
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    child = spawn(target, LATE_WORKLOAD)
    other = None
    try:
        pid = child.read_json(timeout=60)["pid"]
        # GIVEN another tracer's uprobe on the timed-wait call in take_gil, where
        # the contended set probes too, registered with a reference counter
        # (as USDT probes are; BCC registers its uprobes without one)
        site = inspect_binary(target.interpreter_elf).sites
        assert site is not None and site.waits
        other = open_uprobe(target.interpreter_elf, site.waits[0].address, pid,
                            harmless_counter(target.interpreter_elf))
        # WHEN otel-gil attaches to the same process
        proc = subprocess.run([sys.executable, "-m", "otel_gil", "record", "--pid", str(pid),
                               "--duration", "1"], capture_output=True, text=True, timeout=120)
        # THEN it says exactly that, in one line, with the remedy
        assert proc.returncode == 4
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "another tracer already has a uprobe" in lines[0]
        assert "ref_ctr_offset mismatch" in lines[0]
    finally:
        if other is not None:
            os.close(other)
        child.send("stop")
        child.close()


@pytest.mark.ebpf
def test_several_targets_at_once() -> None:
    # GIVEN two interpreters of different versions, traced by one session
    picked = [t for t in all_targets() if t.name in ("pyenv-3.8", "pyenv-3.12")]
    for t in picked:
        require(t)
    children = [spawn(t, WORKLOAD) for t in picked]
    try:
        for c in children:
            c.read_json(timeout=60)
        session = Session(ProbeConfig())
        for c in children:
            session.add(c.host_pid)
        # WHEN both run their 4 CPU-bound threads at the same time
        for c in children:
            c.send("go")
        results = {}
        while len(results) < len(children):
            session.step(50)
            for c in children:
                if c.host_pid not in results:
                    try:
                        results[c.host_pid] = c.read_json(timeout=0.01)
                    except TimeoutError:
                        pass
        for c in children:
            c.send("exit")
            c.popen.wait(timeout=30)
        while session.active:
            session.step(50)
        session.close()
    finally:
        for c in children:
            c.close()
    # THEN each process's burner threads are attributed to it, none lost
    for pid, result in results.items():
        mine = {t.ns_tid for t in session.threads.values() if t.pid == pid}
        assert {int(k) for k in result["cpu_ns"]} <= mine
    assert {iv.pid for iv in session.intervals} == set(results)
    assert session.lost_events() == 0
