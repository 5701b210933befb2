"""The traced app of tests/test_faults.py: instrument()s itself (spawn mode), then
does what the test writes on its stdin, one command a line, answering each with
one JSON line on stdout. Everything it logs is prefixed "app: ", so the test can
tell the app's lines from its spawned sidecar's, which share its stderr.

Its own spans go to APP_OTLP_ENDPOINT (OTLP/gRPC, batched), or, without it, to
an in-memory exporter with no background thread; OTEL_EXPORTER_OTLP_* is left
to the sidecar. It says hello (its pid, and whether tracing is live) once
wait_until_live() returns, or with APP_WAIT_LIVE=0 as soon as its registration
is on its way to the sidecar. Commands:

  burn THREADS SECONDS  threads burn CPU in short spans, in contention
  park THREADS SECONDS  the same, then the threads stay alive, blocked
  churn COUNT           COUNT short-lived threads, one span each, 25 at a time
  table                 the context table's state
  uninstrument          otel_gil.uninstrument(), timed
  exit                  flush its own spans and exit 0
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List

logging.basicConfig(format="app: %(message)s")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    BatchSpanProcessor,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import otel_gil  # noqa: E402
from otel_gil.abi import slots  # noqa: E402
from otel_gil.app import context  # noqa: E402

SERVICE = "fault-app"
SPAN_WORK_S = 0.01  # each span burns this long: long enough to wait for the GIL in it


def _provider() -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    endpoint = os.environ.get("APP_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                                        insecure=True)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return provider


PROVIDER = _provider()
trace.set_tracer_provider(PROVIDER)
TRACER = trace.get_tracer("fault-app")
made = 0  # spans this app made (ended), all commands together
made_lock = threading.Lock()
parked = threading.Event()  # never set: parked threads stay blocked until exit


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _burner(name: str, seconds: float, park: bool, counts: Dict[str, int],
            ends: List[float]) -> None:
    global made
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        with TRACER.start_as_current_span(name):
            until = time.monotonic() + SPAN_WORK_S
            while time.monotonic() < until:
                sum(i * i for i in range(200))
        n += 1
    with made_lock:
        made += n
        counts[name] = n
        ends.append(time.monotonic())
    if park:
        parked.wait()


def burn(threads: int, seconds: float, park: bool) -> None:
    counts: Dict[str, int] = {}
    ends: List[float] = []
    workers = [threading.Thread(target=_burner, name=f"burner-{i}", daemon=True,
                                args=(f"burner-{i}", seconds, park, counts, ends))
               for i in range(threads)]
    for w in workers:
        w.start()
    if park:
        while len(ends) < threads:
            time.sleep(0.01)
    else:
        for w in workers:
            w.join()
    _say(burned=counts, last_span_end=max(ends), parked=park)


def _short(index: int) -> None:
    global made
    with TRACER.start_as_current_span("short"):
        sum(range(2000))
    with made_lock:
        made += 1


def churn(count: int) -> None:
    started = 0
    while started < count:
        wave = [threading.Thread(target=_short, args=(started + i,), name=f"short-{started + i}")
                for i in range(min(25, count - started))]
        for t in wave:
            t.start()
        for t in wave:
            t.join()
        started += len(wave)
    _say(churned=started)


def table() -> None:
    tab = context.current_table()
    assert tab is not None
    records = slots.parse_slots(tab.raw())
    _say(live_slots=sorted(r.tid for r in records if not r.exited),
         live_threads=sorted(t.native_id for t in threading.enumerate()
                             if t.native_id is not None),
         unplaced=tab.unplaced, errors=tab.errors)


def main() -> None:
    otel_gil.instrument()
    if os.environ.get("APP_WAIT_LIVE", "1") == "1":
        live = otel_gil.wait_until_live(60)
    else:
        # Only until the registration is on its way: the agent thread sends it
        # right after spawning the sidecar and setting _sock, which is long
        # before the sidecar has compiled its probes and read it.
        agent = otel_gil._agent
        while agent._sock is None and not agent.done.is_set():
            time.sleep(0.001)
        time.sleep(0.2)
        live = agent.live.is_set()
    _say(pid=os.getpid(), live=live, status=otel_gil.status())
    with TRACER.start_as_current_span("main"):  # the main thread's waits are in a span too
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd in ("burn", "park"):
                burn(int(args[0]), float(args[1]), park=cmd == "park")
            elif cmd == "churn":
                churn(int(args[0]))
            elif cmd == "table":
                table()
            elif cmd == "uninstrument":
                began = time.monotonic()
                otel_gil.uninstrument()
                _say(uninstrumented=time.monotonic() - began, status=otel_gil.status())
            elif cmd == "exit":
                break
    PROVIDER.shutdown()  # its own spans: all delivered before it says so
    _say(exit=made)


if __name__ == "__main__":
    main()
