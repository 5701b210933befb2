"""Free-threaded CPython whose GIL comes back at run time.

A free-threaded build started without PYTHON_GIL runs with its GIL disabled
until it imports an extension that does not declare ``Py_mod_gil``: then
``_PyEval_EnableGILPermanent`` (3.13+ Python/ceval_gil.c) switches it on for
good. The extension is built here, with gcc and the target's own headers, from
a few lines of C; nothing in the standard library is such a module (all of it
declares Py_MOD_GIL_NOT_USED).

otel-gil must say once that there is nothing to measure, keep watching, and
trace from the moment the GIL is on: the session attaches its probes then,
`record` says so, a sidecar does it for an app registered while its GIL was
off (gil.wait spans follow), and `doctor --pid` reports the GIL's state as it
is now.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import opentelemetry
import pytest
from independent_counter import TakeGilCounter
from otlp_receiver import OtlpReceiver
from targets import Child, PythonTarget, all_targets, require, spawn
from test_record import assert_hold_matches_cpu, stolen_ns

import otel_gil
from otel_gil import names
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import GIL_WATCH_INTERVAL_NS, Session
from otel_gil.target import process

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


def _until(done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


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
        session = Session(ProbeConfig(probes="all"))  # all: acquisitions are compared one by one
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
            assert info.target.gil.enabled_count == process.GIL_ENABLED_PERMANENTLY
            # AND doctor now says tracing would work
            doc = _doctor_pid(child.host_pid)
            assert doc["exit"] == 0 and doc["target"]["gil"]["state"] == "GIL enabled"
            # WHEN two threads contend for the GIL now
            counter = TakeGilCounter(info.target)
            try:
                stolen = stolen_ns()
                child.send("go")
                result: Dict[str, Any] = {}
                while not result:
                    session.step(50)
                    try:
                        result = child.read_json(timeout=0.05)
                    except TimeoutError:
                        continue
                stolen = stolen_ns() - stolen
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
                                result["runnable_ns"][ns_tid] + stolen)
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


# An instrumented app: registers with the sidecar while its GIL is off, then
# enables it and runs two threads, each in "request" spans.
INSTRUMENTED = r"""
import json, os, sys, threading, time, warnings
sys.path[:0] = [SITE, EXT]
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
import otel_gil
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("ft-app")
otel_gil.instrument()
print(json.dumps({"live": otel_gil.wait_until_live(120), "gil": sys._is_gil_enabled()}),
      flush=True)
sys.stdin.readline()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import gilmod
print(json.dumps({"gil": sys._is_gil_enabled()}), flush=True)
sys.stdin.readline()
spans = {}
def worker():
    mine = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        with tracer.start_as_current_span("request") as span:
            mine.append(f"{span.get_span_context().span_id:016x}")
            until = time.monotonic() + 0.03
            while time.monotonic() < until:
                sum(i * i for i in range(200))
    spans[threading.get_native_id()] = mine
threads = [threading.Thread(target=worker) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"spans": spans}), flush=True)
"""


@pytest.mark.ebpf
@pytest.mark.parametrize("target", FREE_THREADED, ids=lambda t: t.name.replace("-gil", ""))
def test_sidecar_traces_an_app_whose_gil_is_enabled_after_it_registered(
        target: PythonTarget, tmp_path: Path) -> None:
    require(target)
    (tmp_path / "ext").mkdir()
    ext = build_gilmod(target, tmp_path / "ext")
    site = tmp_path / "site"
    packages = Path(opentelemetry.__path__[0]).parent
    shutil.copytree(packages / "opentelemetry", site / "opentelemetry")
    shutil.copy(packages / "typing_extensions.py", site)
    shutil.copytree(Path(otel_gil.__file__).parent, site / "otel_gil",
                    ignore=shutil.ignore_patterns("__pycache__"))
    sock = tmp_path / "otel-gil.sock"
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "200",
               "OTEL_PYTHON_GIL_PROMETHEUS_PORT": "0"}
        # GIVEN a sidecar, and a free-threaded app with its GIL off registered with it
        sidecar = subprocess.Popen([sys.executable, "-m", "otel_gil", "sidecar", "--listen",
                                    str(sock)], env={**os.environ, **env},
                                   stderr=subprocess.PIPE, text=True)
        assert sidecar.stderr is not None
        sidecar_log: List[str] = []
        reader = threading.Thread(target=lambda: sidecar_log.extend(iter(
            sidecar.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            _until(lambda: any("listening" in ln for ln in sidecar_log), timeout=60)
            code = INSTRUMENTED.replace("SITE", repr(str(site))).replace("EXT", repr(str(ext)))
            with spawn(_gil_unset(target), code,
                       env={"OTEL_PYTHON_GIL_MODE": "connect",
                            "OTEL_PYTHON_GIL_SOCKET": str(sock)}) as child:
                assert child.read_json(timeout=180) == {"live": True, "gil": False}
                # WHEN it enables its GIL, then its threads contend for it in their spans
                child.send("import")
                assert child.read_json(timeout=60) == {"gil": True}
                # THEN the sidecar notices without a restart (its watch reads the
                # GIL's state every 50 ms)
                _until(lambda: any("the GIL was enabled at run time: tracing from now" in ln
                                   for ln in sidecar_log), timeout=60)
                child.send("go")
                spans: Dict[str, List[str]] = child.read_json(timeout=120)["spans"]
                assert child.popen.wait(timeout=60) == 0
                app_log = child.stderr()
            receiver.wait_for_spans(
                lambda got: sum(s.name == names.GIL_WAIT.name for s in got) >= 5, timeout=60)
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(timeout=30)
            reader.join(timeout=10)
        waits = [s for s in receiver.spans() if s.name == names.GIL_WAIT.name]
    # THEN the app said once that there was nothing to measure yet
    assert app_log.count("nothing to measure yet") == 1, app_log
    assert ("otel-gil: GIL disabled: nothing to measure yet; the sidecar traces from the moment "
            "the GIL is enabled") in app_log
    # AND traced the waits from then on, each the child of its thread's span
    assert len(waits) >= 5
    for w in waits:
        thread = str(w.attributes[names.THREAD_NATIVE_ID.name])
        assert w.parent_span_id in spans[thread], (thread, w.parent_span_id)
