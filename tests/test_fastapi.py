"""A real FastAPI service (examples/fastapi_app.py) under uvicorn and
`opentelemetry-instrument`, with no otel-gil code, loaded with real HTTP
requests on loopback: its GIL waits arrive under the server spans of the
requests that waited, nested in them, with no orphans; with asyncio's loop
and with uvloop."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from otlp_receiver import OtlpReceiver, SpanRecord

from otel_gil import names

ROOT = Path(__file__).parent.parent
LOAD_SECONDS = 3.0
# A burst window is the endpoint's own clock reads; this far inside it, the
# loop thread was surely running that request's step.
EDGE_NS = 200_000
# (path, client threads): requests on the loop, in the thread pool, and a
# CPU-heavy sync one that makes the others wait.
LOAD = [("/async", 2), ("/sync", 1), ("/cpu", 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, timeout: float = 10.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, (path, response.status)
        return json.loads(response.read())
    finally:
        conn.close()


def _load(port: int, path: str, until: float, errors: List[str]) -> None:
    """Keep-alive requests to one path until a deadline (at most 2000)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(2000):
            if time.monotonic() >= until:
                return
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"{path}: {response.status}")
    except OSError as exc:
        errors.append(f"{path}: {exc}")
    finally:
        conn.close()


def serve_and_load(loop: str) -> Dict[str, Any]:
    port = _free_port()
    with OtlpReceiver() as receiver, tempfile.NamedTemporaryFile("w+") as err:
        env = dict(os.environ, OTEL_SERVICE_NAME="fastapi-app",
                   OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                   OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_BSP_SCHEDULE_DELAY="200",
                   # The app's SDK drops spans past a full queue (2048 by default):
                   # a wait under a dropped request span would look like an orphan.
                   OTEL_BSP_MAX_QUEUE_SIZE="100000",
                   OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
                   OTEL_PYTHON_GIL_PROMETHEUS_PORT="0", OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS="0.5")
        bindir = Path(sys.executable).parent
        server = subprocess.Popen(
            [str(bindir / "opentelemetry-instrument"), str(bindir / "uvicorn"),
             "fastapi_app:app", "--app-dir", str(ROOT / "examples"), "--host", "127.0.0.1",
             "--port", str(port), "--loop", loop, "--no-access-log"],
            env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_traced(server, err, port)
            errors: List[str] = []
            until = time.monotonic() + LOAD_SECONDS
            clients = [threading.Thread(target=_load, args=(port, path, until, errors))
                       for path, count in LOAD for _ in range(count)]
            for c in clients:
                c.start()
            for c in clients:
                c.join(timeout=60)
            assert not errors, errors[:5]
            windows = _get(port, "/windows")
            # uvicorn re-raises SIGTERM once shut down, so the SDK's atexit flush
            # never runs: stop it only once every request's span has arrived.
            wanted = {w["span_id"] for w in windows}
            receiver.wait_for_spans(lambda spans: wanted <= {s.span_id for s in spans},
                                    timeout=30)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        with open(err.name) as f:
            stderr = f.read()
        assert server.returncode in (0, -signal.SIGTERM), stderr[-3000:]
        assert "Finished server process" in stderr, stderr[-3000:]
        receiver.wait_for_spans(lambda spans: any(s.name == names.GIL_WAIT.name for s in spans),
                                timeout=30)
        time.sleep(1.5)
        return {"windows": windows, "spans": receiver.spans(), "stderr": stderr}


def _wait_traced(server: subprocess.Popen, err: Any, port: int) -> None:
    """Until uvicorn answers and otel-gil's probes are attached to it."""
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        assert server.poll() is None, "uvicorn exited"
        with open(err.name) as f:  # its own offset: uvicorn's writes stay appends
            text = f.read()
        if "otel-gil: tracing pid" in text:
            try:
                _get(port, "/windows", timeout=2)
                return
            except (OSError, AssertionError):
                pass
        time.sleep(0.2)
    raise TimeoutError(f"uvicorn did not become traced: {text[-2000:]}")


def server_span_of(span: SpanRecord, by_id: Dict[str, SpanRecord]) -> SpanRecord:
    while span.parent_span_id:
        span = by_id[span.parent_span_id]
    return span


@pytest.mark.ebpf
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_fastapi_waits_are_under_the_request_that_waited(loop: str) -> None:
    # GIVEN a FastAPI app under uvicorn and opentelemetry-instrument, loaded with
    # requests to async, sync (thread pool) and CPU-heavy endpoints
    run = serve_and_load(loop)
    assert run["stderr"].count("otel-gil: tracing pid") == 1, run["stderr"][-2000:]
    spans: List[SpanRecord] = run["spans"]
    by_id = {s.span_id: s for s in spans}
    windows = {w["span_id"]: w for w in run["windows"]}
    waits = [s for s in spans if s.name == names.GIL_WAIT.name]
    on_loop = [w for w in waits if w.attributes[names.THREAD_NAME.name] == "MainThread"]
    in_pool = [w for w in waits if w.attributes[names.THREAD_NAME.name] != "MainThread"]
    for w in waits:
        # THEN no wait is an orphan, and each is nested in its parent
        parent = by_id.get(w.parent_span_id)
        assert parent is not None, f"orphan wait {w.span_id} on {w.attributes}"
        slack = w.attributes[names.CLOCK_UNCERTAINTY_NS.name]
        assert parent.start_ns - slack <= w.start_ns < w.end_ns <= parent.end_ns + slack, \
            (parent.name, w.attributes[names.THREAD_NAME.name], w.start_ns - parent.start_ns,
             w.end_ns - w.start_ns, parent.end_ns - w.end_ns)
        # AND its trace's root is the server span of a request to an endpoint
        server = server_span_of(parent, by_id)
        assert server.resource["service.name"] == "fastapi-app"
        assert server.name.split()[-1] in ("/async", "/sync", "/cpu", "/windows"), server.name
    for w in in_pool:
        # AND a thread-pool wait is under the sync request that ran on that thread
        server = server_span_of(by_id[w.parent_span_id], by_id)
        ran = windows.get(server.span_id)
        assert ran is not None and ran["kind"] in ("sync", "cpu"), (server.name, ran)
        assert ran["tid"] == w.attributes[names.THREAD_NATIVE_ID.name]
    bursts = [r for r in run["windows"] if r["kind"] == "async"]
    in_burst = 0
    for w in on_loop:
        slack = w.attributes[names.CLOCK_UNCERTAINTY_NS.name] + EDGE_NS
        server = server_span_of(by_id[w.parent_span_id], by_id)
        for r in bursts:
            if r["start"] + slack < w.start_ns < r["end"] - slack:
                # AND a loop wait that began in an async endpoint's burst is
                # under that very request
                assert server.span_id == r["span_id"], (server.name, r)
                in_burst += 1
    # AND there were enough of each kind to mean something
    assert len(on_loop) >= 5 and len(in_pool) >= 5, (len(on_loop), len(in_pool))
    assert in_burst >= 1, "no loop-thread wait began inside an async endpoint's burst"
