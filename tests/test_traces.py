"""GIL waits inside the app's own traces: a real app, a real sidecar, real uprobes,
and a real OTLP/gRPC receiver on loopback receiving both the app's spans and the
sidecar's.

examples/traced_app.py: a "hog" thread burns CPU in its own span, request threads
make short "request" spans, one thread works under an unsampled parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from otlp_receiver import OtlpReceiver, SpanRecord

from otel_gil import names
from otel_gil.app import protocol

ROOT = Path(__file__).parent.parent
APP = ROOT / "examples" / "traced_app.py"
UNSAMPLED_TRACE = "1234567890abcdef1234567890abcdef"


@dataclass
class AppRun:
    proc: subprocess.CompletedProcess
    started: Dict[str, Any]
    threads: Dict[str, Dict[str, Any]]
    spans: List[SpanRecord]

    def gil_spans(self) -> List[SpanRecord]:
        return [s for s in self.spans if s.name in (names.GIL_WAIT.name, names.GIL_HOLD.name)]

    def by_id(self) -> Dict[str, SpanRecord]:
        return {s.span_id: s for s in self.spans}


def _env(receiver: OtlpReceiver, **extra: str) -> Dict[str, str]:
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
               OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_BSP_SCHEDULE_DELAY="200",
               OTEL_PYTHON_GIL_PROMETHEUS_PORT="0")
    env.update(extra)
    return env


def _run_app(receiver: OtlpReceiver, argv: Optional[List[str]] = None,
             **env: str) -> AppRun:
    cmd = argv or [sys.executable, str(APP), "--seconds", "2"]
    proc = subprocess.run(cmd, env=_env(receiver, **env), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    threads = next(m["threads"] for m in lines if "threads" in m)
    # The sidecar flushes when the app's connection closes; give the export a moment.
    receiver.wait_for_spans(lambda spans: any(s.name == names.GIL_WAIT.name for s in spans),
                            timeout=30)
    time.sleep(1.0)
    return AppRun(proc, lines[0], threads, receiver.spans())


@pytest.fixture(scope="module")
def app_run() -> Any:
    with OtlpReceiver() as receiver:
        yield _run_app(receiver)


@pytest.mark.ebpf
def test_app_is_traced_live(app_run: AppRun) -> None:
    assert app_run.started["live"] is True, app_run.started
    assert app_run.gil_spans()


@pytest.mark.ebpf
def test_every_gil_span_is_a_child_of_the_span_active_on_its_thread(app_run: AppRun) -> None:
    spans = app_run.by_id()
    thread_traces = {name: set(t["trace_ids"]) for name, t in app_run.threads.items()}
    for gs in app_run.gil_spans():
        # GIVEN a GIL span WHEN its parent is looked up THEN it is one of the app's spans
        parent = spans.get(gs.parent_span_id)
        assert parent is not None, f"orphan {gs.name} {gs.span_id}"
        assert parent.trace_id == gs.trace_id
        # AND that span was running on the very thread that waited (or held)
        thread = gs.attributes[names.THREAD_NAME.name]
        assert gs.trace_id in thread_traces[thread], (thread, gs.trace_id)
        assert gs.attributes[names.THREAD_NATIVE_ID.name] == \
            app_run.threads[thread]["native_id"]
        assert gs.attributes[names.THREAD_ID.name] == app_run.threads[thread]["ident"]
        assert gs.resource["service.name"] == "gil-example"


@pytest.mark.ebpf
def test_every_gil_span_is_nested_in_its_parent(app_run: AppRun) -> None:
    spans = app_run.by_id()
    for gs in app_run.gil_spans():
        parent = spans[gs.parent_span_id]
        slack = gs.attributes[names.CLOCK_UNCERTAINTY_NS.name]
        assert parent.start_ns - slack <= gs.start_ns < gs.end_ns <= parent.end_ns + slack, \
            (gs.name, gs.start_ns - parent.start_ns, parent.end_ns - gs.end_ns, slack)


@pytest.mark.ebpf
def test_request_waits_name_the_hog_and_link_to_its_span(app_run: AppRun) -> None:
    hog_span = next(s for s in app_run.spans if s.name == "hog")
    waits = [s for s in app_run.gil_spans() if s.name == names.GIL_WAIT.name
             and s.attributes[names.THREAD_NAME.name].startswith("request-")]
    assert len(waits) >= 10
    blamed = [w for w in waits if "hog" in w.attributes[names.HOLDER_NAMES.name]]
    # THEN most request waits were spent behind the hog, and link to its span.
    # (The requesters want ~25% of the GIL together, so ~90% of their waits name
    # the hog; with 2 ms bursts they wanted all of it and queued behind each other.)
    assert len(blamed) >= 0.5 * len(waits), (len(blamed), len(waits))
    for w in blamed:
        i = list(w.attributes[names.HOLDER_NAMES.name]).index("hog")
        assert w.attributes[names.HOLDER_HELD_NS.name][i] > 0
        assert (hog_span.trace_id, hog_span.span_id) in [(t, s) for t, s, _ in w.links]


@pytest.mark.ebpf
def test_the_unsampled_trace_gets_nothing(app_run: AppRun) -> None:
    assert app_run.threads["unsampled"]["trace_ids"]
    for gs in app_run.gil_spans():
        assert gs.trace_id != UNSAMPLED_TRACE
        assert gs.attributes[names.THREAD_NAME.name] != "unsampled"


# ------------------------------------------------------------------ connect mode


@pytest.fixture()
def sidecar(tmp_path: Path) -> Any:
    """A long-running sidecar on a Unix socket, as in a sidecar container."""
    sock = tmp_path / "otel-gil.sock"
    receiver = OtlpReceiver()
    receiver.__enter__()
    proc = subprocess.Popen([sys.executable, "-m", "otel_gil", "sidecar", "--listen", str(sock)],
                            env=_env(receiver), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    assert "listening" in proc.stderr.readline()
    yield sock, receiver, proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    receiver.__exit__(None, None, None)


@pytest.mark.ebpf
def test_connect_mode_refuses_to_trace_someone_else(sidecar: Any) -> None:
    sock_path, _, _ = sidecar
    import socket

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock_path))
        # GIVEN a client WHEN it asks to have another process traced
        s.sendall(protocol.encode({"op": "register", "version": 1, "pid": other.pid}))
        reply = protocol.read_message(s, 30)
        # THEN the sidecar refuses
        assert reply["ok"] is False
        assert "refused" in reply["error"]
        s.close()
    finally:
        other.kill()
        other.wait()


@pytest.mark.ebpf
def test_app_in_its_own_pid_namespace_gets_namespaced_thread_ids(sidecar: Any) -> None:
    sock_path, receiver, _ = sidecar
    # GIVEN the app in its own PID namespace, registering with a host sidecar
    run = _run_app(receiver, ["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                              str(APP), "--seconds", "2"],
                   OTEL_PYTHON_GIL_MODE="connect", OTEL_PYTHON_GIL_SOCKET=str(sock_path))
    assert run.started["pid"] == 1  # the app is pid 1 of its namespace
    # THEN thread ids in the spans are the app's own (threading.get_native_id())
    waits = run.gil_spans()
    assert waits
    for gs in waits:
        thread = run.threads[gs.attributes[names.THREAD_NAME.name]]
        assert gs.attributes[names.THREAD_NATIVE_ID.name] == thread["native_id"]
        assert gs.attributes[names.THREAD_HOST_ID.name] != thread["native_id"]
        assert gs.attributes[names.PROCESS_PID.name] == 1


@pytest.mark.ebpf
def test_sidecar_sharing_the_apps_pid_namespace(tmp_path: Path) -> None:
    # GIVEN app and spawned sidecar both in a child PID namespace (a sidecar
    # container in the app's pod, shareProcessNamespace)
    with OtlpReceiver() as receiver:
        run = _run_app(receiver, ["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                                  str(APP), "--seconds", "2"])
    # THEN the probes, keyed by the ids the sidecar sees, still find the app
    assert run.started["live"] is True, run.started
    waits = [s for s in run.gil_spans() if s.name == names.GIL_WAIT.name]
    assert waits
    for gs in waits:
        thread = run.threads[gs.attributes[names.THREAD_NAME.name]]
        assert gs.attributes[names.THREAD_NATIVE_ID.name] == thread["native_id"]
        assert gs.attributes[names.PROCESS_PID.name] == 1


# -------------------------------------------------------------- the app comes first


@pytest.mark.ebpf
def test_app_survives_its_sidecar_being_killed() -> None:
    with OtlpReceiver() as receiver:
        app = subprocess.Popen([sys.executable, str(APP), "--seconds", "4"], env=_env(receiver),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert app.stdout is not None
        started = json.loads(app.stdout.readline())
        assert started["live"] is True
        # GIVEN the app's spawned sidecar WHEN it is SIGKILLed mid-run
        children = _children(app.pid)
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        out, err = app.communicate(timeout=60)
        # THEN the app runs to a normal exit, and says once that tracing stopped
        assert app.returncode == 0, err
        assert '"threads"' in out
        assert err.count("GIL tracing off") == 1, err


@pytest.mark.ebpf
def test_spawned_sidecar_exits_when_the_app_is_sigkilled() -> None:
    with OtlpReceiver() as receiver:
        app = subprocess.Popen([sys.executable, str(APP), "--seconds", "20"], env=_env(receiver),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert app.stdout is not None
        assert json.loads(app.stdout.readline())["live"] is True
        (sidecar,) = _children(app.pid)
        # WHEN the app is killed outright
        app.kill()
        app.wait()
        # THEN its sidecar notices (the kernel closed their socket) and exits
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{sidecar}") and _state(sidecar) != "Z":
            assert time.monotonic() < deadline, "sidecar outlived its app"
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _children(pid: int) -> List[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def test_unprivileged_app_without_sidecar_warns_once_and_runs(tmp_path: Path) -> None:
    # GIVEN an app running as nobody, with no sidecar socket
    code = ("import logging, otel_gil; logging.basicConfig(); otel_gil.instrument(); "
            "print('live', otel_gil.wait_until_live(5)); print('ran')")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    env = dict(os.environ, OTEL_PYTHON_GIL_SOCKET=str(tmp_path / "absent.sock"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    # THEN it runs to the end, with exactly one warning saying why tracing is off
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["live", "False", "ran"]
    assert proc.stderr.count("GIL tracing off") == 1, proc.stderr
    assert "may not use eBPF" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.ebpf
def test_opentelemetry_instrument_path_needs_no_code_change() -> None:
    with OtlpReceiver() as receiver:
        # GIVEN an app with no otel-gil code, run under opentelemetry-instrument
        env = _env(receiver, OTEL_SERVICE_NAME="auto-app", OTEL_METRICS_EXPORTER="none",
                   OTEL_LOGS_EXPORTER="none")
        instrument = Path(sys.executable).parent / "opentelemetry-instrument"
        proc = subprocess.run([str(instrument), sys.executable, str(ROOT / "examples" /
                               "auto_app.py")], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        # THEN its work spans get gil.wait children, in its own service, from one sidecar
        assert proc.stderr.count("otel-gil: tracing pid") == 1, proc.stderr
        receiver.wait_for_spans(lambda spans: any(s.name == names.GIL_WAIT.name
                                                  for s in spans), timeout=30)
        time.sleep(1.0)
        spans = receiver.spans()
        by_id = {s.span_id: s for s in spans}
        waits = [s for s in spans if s.name == names.GIL_WAIT.name]
        assert waits
        for w in waits:
            assert by_id[w.parent_span_id].name.startswith("work-")
            assert w.resource["service.name"] == "auto-app"


UNINSTRUMENT = """
import json, otel_gil
from opentelemetry import context
original = context._RUNTIME_CONTEXT
otel_gil.instrument()
otel_gil.instrument()  # twice is harmless
live = otel_gil.wait_until_live(30)
hooked = context._RUNTIME_CONTEXT is not original
sidecar = otel_gil._agent.sidecar
otel_gil.uninstrument()  # returns at once; the sidecar exits on its own
restored, status = context._RUNTIME_CONTEXT is original, otel_gil.status()
print(json.dumps({"live": live, "hooked": hooked, "restored": restored,
                  "sidecar_exit": sidecar.wait(60), "status": status}))
"""


@pytest.mark.ebpf
def test_uninstrument_undoes_instrument() -> None:
    with OtlpReceiver() as receiver:
        proc = subprocess.run([sys.executable, "-c", UNINSTRUMENT], env=_env(receiver),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # THEN the hook was in place while live, and uninstrument() put the original
    # runtime context back and let the spawned sidecar exit by itself (status 0,
    # not killed)
    assert json.loads(proc.stdout) == {"live": True, "hooked": True, "restored": True,
                                       "sidecar_exit": 0, "status": "not instrumented"}
    assert proc.stderr.count("otel-gil: tracing pid") == 1


FORKING_APP = r"""
import json, os, sys, threading, time
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
import otel_gil

def setup():
    provider = TracerProvider(resource=Resource.create({"service.name": "forking"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider

def burn(s):
    end = time.monotonic() + s
    while time.monotonic() < end:
        sum(i * i for i in range(300))

def worker():
    provider = TracerProvider(resource=Resource.create({"service.name": "forking"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("w")
    live = otel_gil.wait_until_live(30)
    def spin(name):
        with tracer.start_as_current_span(name):
            burn(1.5)
    ts = [threading.Thread(target=spin, args=(f"work-{i}",), name=f"w{i}") for i in range(2)]
    [t.start() for t in ts]; [t.join() for t in ts]
    provider.shutdown()
    print(json.dumps({"worker": os.getpid(), "live": live}), flush=True)
    os._exit(0)

setup()
otel_gil.instrument()
assert otel_gil.wait_until_live(30)
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        worker()
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
print(json.dumps({"master": os.getpid(), "workers": pids}), flush=True)
"""


@pytest.mark.ebpf
def test_forked_workers_are_traced() -> None:
    with OtlpReceiver() as receiver:
        # GIVEN a pre-fork master that instrumented, then forked 2 workers
        proc = subprocess.run([sys.executable, "-c", FORKING_APP], env=_env(receiver),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        workers = next(m["workers"] for m in lines if "workers" in m)
        assert all(m["live"] for m in lines if "worker" in m)
        # THEN each worker's own threads got gil.wait spans under its own spans
        receiver.wait_for_spans(lambda spans: {
            s.attributes.get(names.PROCESS_PID.name) for s in spans
            if s.name == names.GIL_WAIT.name} >= set(workers), timeout=30)
        spans = receiver.spans()
        by_id = {s.span_id: s for s in spans}
        for gs in (s for s in spans if s.name == names.GIL_WAIT.name):
            parent = by_id[gs.parent_span_id]
            assert parent.name.startswith("work-")
            assert gs.attributes[names.PROCESS_PID.name] in workers
