"""gil.wait spans from apps on the chrooted sid interpreters (3.14, 3.15, stripped 3.15).

The app runs on sid's own python3.X, chrooted in its tree and in its own PID
namespace, as in a container. It imports otel_gil and OpenTelemetry's pure
Python API and SDK from a copy under the tree's /tmp (the host's .venv is for
3.11), registers with a host sidecar on a Unix socket inside the tree
(connect mode), and makes "request" spans on three CPU-bound threads. It
exports none of its own spans: it prints each thread's span ids, and every
gil.wait span the sidecar sends to a real OTLP receiver must be the child of
one of them, on the thread that waited.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import opentelemetry
import pytest
from otlp_receiver import OtlpReceiver
from targets import PythonTarget, all_targets, require, spawn

import otel_gil
from otel_gil import names

APP = r"""
import json, os, sys, threading, time
sys.path.insert(0, SITE)
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
import otel_gil
trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": "sid-app"})))
tracer = trace.get_tracer("sid-app")
otel_gil.instrument()
print(json.dumps({"live": otel_gil.wait_until_live(120), "pid": os.getpid()}), flush=True)
sys.stdin.readline()
spans = {}
def worker():
    mine = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        with tracer.start_as_current_span("request") as span:
            mine.append(f"{span.get_span_context().span_id:016x}")
            until = time.monotonic() + 0.03
            while time.monotonic() < until:
                sum(i * i for i in range(200))
    spans[threading.get_native_id()] = mine
threads = [threading.Thread(target=worker, name=f"worker-{i}") for i in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"spans": spans}), flush=True)
"""

SID = [t for t in all_targets() if t.root is not None]  # sid-3.14, sid-3.15, stripped-3.15
SITE_PACKAGES = Path(opentelemetry.__path__[0]).parent


@contextlib.contextmanager
def app_dir(target: PythonTarget) -> Iterator[Path]:
    """A fresh directory under the target's /tmp holding the app's packages,
    removed afterwards."""
    assert target.root is not None
    path = Path(tempfile.mkdtemp(prefix="otel-gil-test-", dir=f"{target.root}/tmp"))
    try:
        site = path / "site"
        site.mkdir()
        shutil.copytree(SITE_PACKAGES / "opentelemetry", site / "opentelemetry")
        shutil.copy(SITE_PACKAGES / "typing_extensions.py", site)
        shutil.copytree(Path(otel_gil.__file__).parent, site / "otel_gil",
                        ignore=shutil.ignore_patterns("__pycache__"))
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.ebpf
@pytest.mark.parametrize("target", SID, ids=lambda t: t.name)
def test_gil_waits_are_children_of_the_waiting_threads_spans(target: PythonTarget) -> None:
    require(target)
    assert target.root is not None
    with app_dir(target) as directory, OtlpReceiver() as receiver:
        inside = "/" + str(directory.relative_to(target.root))
        sock = directory / "otel-gil.sock"
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "200",
               "OTEL_PYTHON_GIL_PROMETHEUS_PORT": "0"}
        # GIVEN a host sidecar listening on a socket inside the tree
        sidecar = subprocess.Popen([sys.executable, "-m", "otel_gil", "sidecar", "--listen",
                                    str(sock)], env={**os.environ, **env},
                                   stderr=subprocess.PIPE, text=True)
        try:
            assert sidecar.stderr is not None
            assert "listening" in sidecar.stderr.readline()
            # AND an app on sid's python, chrooted, registering with it
            app_env = {"OTEL_PYTHON_GIL_MODE": "connect",
                       "OTEL_PYTHON_GIL_SOCKET": f"{inside}/otel-gil.sock"}
            code = APP.replace("SITE", repr(f"{inside}/site"))
            with spawn(target, code, env=app_env) as child:
                started = child.read_json(timeout=180)
                assert started == {"live": True, "pid": 1}, child.stderr()
                # WHEN its threads contend for the GIL inside their spans
                child.send("go")
                spans: Dict[str, List[str]] = child.read_json(timeout=120)["spans"]
                assert child.popen.wait(timeout=60) == 0, child.stderr()
            receiver.wait_for_spans(
                lambda got: sum(s.name == names.GIL_WAIT.name for s in got) >= 5, timeout=60)
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(timeout=30)
        waits = [s for s in receiver.spans() if s.name == names.GIL_WAIT.name]
    # THEN every wait is the child of a span its own thread was in
    assert len(waits) >= 5
    for w in waits:
        thread = str(w.attributes[names.THREAD_NATIVE_ID.name])
        assert w.parent_span_id in spans[thread], (thread, w.parent_span_id)
        assert w.attributes[names.PROCESS_PID.name] == 1
        assert w.resource["service.name"] == "sid-app"
