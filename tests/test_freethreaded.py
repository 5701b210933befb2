"""Free-threaded CPython whose GIL comes back at run time.

A free-threaded build started without PYTHON_GIL runs with its GIL disabled
until it imports an extension that does not declare ``Py_mod_gil``: then
``_PyEval_EnableGILPermanent`` (3.13+ Python/ceval_gil.c) switches it on for
good. The extension is built here, with gcc and the target's own headers, from
a few lines of C; nothing in the standard library is such a module (all of it
declares Py_MOD_GIL_NOT_USED).

otel-gil must say once that there is nothing to measure, keep watching, and
trace from the moment the GIL is on: the session attaches its probes then,
`record` says so, and `doctor --pid` reports the GIL's state as it is now.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict

import pytest
from independent_counter import TakeGilCounter
from targets import Child, PythonTarget, all_targets, require, spawn
from test_record import assert_hold_matches_cpu

from otel_gil import discovery
from otel_gil.probes import ProbeConfig
from otel_gil.session import GIL_WATCH_INTERVAL_NS, Session

GILMOD_C = r"""
#include <Python.h>
/* Single-phase init, no Py_mod_gil slot: importing it enables the GIL. */
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "gilmod", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_gilmod(void) { return PyModule_Create(&def); }
"""

# Threads run GIL-free first, then the GIL is enabled, then two CPU-bound
# threads contend for it. Each step waits for a line on stdin.
CHILD = r"""
import json, os, sys, threading, time, warnings
sys.path.insert(0, sys.argv[1])
def runnable_ns():
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        return int(f.read().split()[1])
def burn(seconds, out, queued):
    t0, q0 = time.thread_time_ns(), runnable_ns()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(i * i for i in range(100))
    out[threading.get_native_id()] = time.thread_time_ns() - t0
    queued[threading.get_native_id()] = runnable_ns() - q0
def burners(seconds):
    out, queued = {}, {}
    threads = [threading.Thread(target=burn, args=(seconds, out, queued)) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    return out, queued
print(json.dumps({"pid": os.getpid(), "gil": sys._is_gil_enabled()}), flush=True)
sys.stdin.readline()
burners(0.3)  # GIL-free: nothing to trace
print(json.dumps({"spun": True}), flush=True)
sys.stdin.readline()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "The global interpreter lock (GIL) has been enabled..."
    import gilmod
print(json.dumps({"gil": sys._is_gil_enabled()}), flush=True)
sys.stdin.readline()
out, queued = burners(1.5)
print(json.dumps({"cpu_ns": out, "runnable_ns": queued}), flush=True)
sys.stdin.readline()
"""

FREE_THREADED = [t for t in all_targets() if t.free_threaded and t.expect_gil]


def _gil_unset(target: PythonTarget) -> PythonTarget:
    """The target as started with PYTHON_GIL unset: its GIL starts disabled."""
    return replace(target, name=target.name.replace("-gil", "-later"),
                   env=tuple(kv for kv in target.env if kv[0] != "PYTHON_GIL"))


def build_gilmod(target: PythonTarget, directory: Path) -> Path:
    """gilmod.so for the target, compiled against its installed headers."""
    prefix = Path(target.binary).parent.parent
    include = prefix / "include" / f"python3.{target.version[1]}t"
    source = directory / "gilmod.c"
    source.write_text(GILMOD_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", f"-I{include}", str(source),
                    "-o", str(directory / "gilmod.so")], check=True, capture_output=True)
    return directory


def _doctor_pid(pid: int) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "otel_gil", "doctor", "--pid", str(pid),
                           "--json"], capture_output=True, text=True, timeout=180)
    assert "Traceback" not in proc.stderr, proc.stderr
    doc: Dict[str, Any] = json.loads(proc.stdout)
    doc["exit"] = proc.returncode
    return doc


def _step_until(session: Session, done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        session.step(20)


@pytest.mark.ebpf
@pytest.mark.parametrize("target", FREE_THREADED, ids=lambda t: t.name.replace("-gil", ""))
def test_gil_enabled_after_attach_is_traced_from_then_on(target: PythonTarget,
                                                         tmp_path: Path) -> None:
    require(target)
    later = _gil_unset(target)
    ext = build_gilmod(target, tmp_path)
    child: Child = spawn(later, CHILD.replace("sys.argv[1]", repr(str(ext))))
    try:
        # GIVEN a free-threaded child started without PYTHON_GIL: GIL disabled
        assert child.read_json(timeout=60)["gil"] is False
        # WHEN doctor looks at it THEN it says so, with the remedy, exit 3
        doc = _doctor_pid(child.host_pid)
        assert doc["exit"] == 3 and doc["verdict"] == "GIL disabled: nothing to measure"
        assert doc["target"]["gil"]["enabled_count"] == 0
        # WHEN a session adds it THEN it is kept, watched, with no probes
        session = Session(ProbeConfig())
        try:
            added = session.add(child.host_pid)
            info = session.targets[child.host_pid]
            assert added.gil.enabled is False and added.gil.disabled_by == ""
            assert info.attached_ns == 0 and session.probes.pids == []
            # WHEN its threads run GIL-free THEN nothing is traced, and it stays watched
            child.send("spin")
            child.read_json(timeout=60)
            for _ in range(5):
                session.step(20)
            assert session.threads == {} and session.active and info.attached_ns == 0
            # WHEN it imports an extension without Py_mod_gil
            child.send("import")
            imported = time.monotonic_ns()
            assert child.read_json(timeout=60)["gil"] is True
            # THEN the session attaches its probes soon after (one watch interval,
            # plus the machine's load: generous bound)
            _step_until(session, lambda: info.attached_ns, timeout=10)
            assert info.gil_enabled_ns == info.attached_ns
            assert info.attached_ns - imported < 5_000_000_000 + GIL_WATCH_INTERVAL_NS
            assert info.target.gil.enabled is True
            assert info.target.gil.enabled_count == discovery.GIL_ENABLED_PERMANENTLY
            # AND doctor now says tracing would work
            doc = _doctor_pid(child.host_pid)
            assert doc["exit"] == 0 and doc["target"]["gil"]["state"] == "GIL enabled"
            # WHEN two threads contend for the GIL now
            counter = TakeGilCounter(info.target)
            try:
                child.send("go")
                result: Dict[str, Any] = {}
                while not result:
                    session.step(50)
                    try:
                        result = child.read_json(timeout=0.05)
                    except TimeoutError:
                        continue
                child.send("exit")
                child.popen.wait(timeout=30)
                _step_until(session, lambda: not session.active, timeout=30)
                independent = counter.hits
            finally:
                counter.close()
        finally:
            session.close()
    finally:
        child.close()
    # THEN their waits and holds are traced exactly, as on a default build
    threads = {t.ns_tid: t for t in session.threads.values()}
    assert sum(t.acquisitions for t in session.threads.values()) == independent
    for ns_tid, cpu_ns in result["cpu_ns"].items():
        assert_hold_matches_cpu(threads[int(ns_tid)].hold_ns, cpu_ns,
                                result["runnable_ns"][ns_tid])
    waits = [iv for iv in session.intervals if iv.kind == "wait"]
    assert len(waits) > 10
    assert all(iv.start_ns >= info.attached_ns for iv in waits)
    assert session.lost_events() == 0


def _wait_for_line(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


@pytest.mark.ebpf
@pytest.mark.parametrize("target", FREE_THREADED, ids=lambda t: t.name.replace("-gil", ""))
def test_record_says_once_it_watches_then_traces(target: PythonTarget, tmp_path: Path) -> None:
    require(target)
    ext = build_gilmod(target, tmp_path)
    child = spawn(_gil_unset(target), CHILD.replace("sys.argv[1]", repr(str(ext))))
    out, err = tmp_path / "record.json", tmp_path / "stderr"
    try:
        child.read_json(timeout=60)
        pid = child.host_pid
        # GIVEN a GIL-less child WHEN record traces it
        with open(err, "w") as stderr:
            record = subprocess.Popen(
                [sys.executable, "-m", "otel_gil", "record", "--pid", str(pid),
                 "--duration", "120", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            _wait_for_line(err, f"watching pid {pid}", timeout=120)
            # AND the child runs GIL-free, then enables its GIL, then contends
            for step in ("spin", "import", "go"):
                child.send(step)
                child.read_json(timeout=60)
            child.send("exit")
            child.popen.wait(timeout=30)
            # THEN record ends with its target
            assert record.wait(timeout=60) == 0, err.read_text()
        finally:
            if record.poll() is None:
                record.kill()
                record.wait()
    finally:
        child.close()
    # AND it said once that there was nothing to measure, then that it traces
    lines = err.read_text().splitlines()
    assert [ln for ln in lines if "watching for it" in ln] == [
        f"otel-gil: pid {pid}: GIL disabled: nothing to measure yet; watching for it to be "
        "enabled"]
    assert f"otel-gil: pid {pid}: the GIL was enabled at run time: tracing from now" in lines
    assert "Traceback" not in err.read_text()
    # AND the record has the burners' waits, and lost nothing
    doc = json.loads(out.read_text())
    assert sum(1 for iv in doc["intervals"] if iv["kind"] == "wait") > 10
    assert doc["lost_events"] == 0


@pytest.mark.ebpf
@pytest.mark.parametrize("target", FREE_THREADED, ids=lambda t: t.name.replace("-gil", ""))
def test_record_of_a_gil_that_stays_disabled_exits_3(target: PythonTarget) -> None:
    require(target)
    child = spawn(_gil_unset(target), "import sys, json, os\n"
                  "print(json.dumps({'pid': os.getpid()}), flush=True)\nsys.stdin.readline()")
    try:
        child.read_json(timeout=60)
        # GIVEN a GIL-less child that never enables its GIL WHEN recorded for 1 s
        proc = subprocess.run(
            [sys.executable, "-m", "otel_gil", "record", "--pid", str(child.host_pid),
             "--duration", "1"], capture_output=True, text=True, timeout=120)
    finally:
        child.close()
    # THEN it said so once while watching, and at the end: exit 3, no table
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == (
        "otel-gil: error: GIL disabled: nothing to measure (it stayed disabled while watched) "
        "(run with PYTHON_GIL=1 to measure the GIL; `otel-gil record` and the sidecar keep "
        "watching and trace from the moment it is enabled)")
    assert sum("nothing to measure yet; watching" in ln for ln in proc.stderr.splitlines()) == 1
