"""No otel-gil code at all: run it under OpenTelemetry's auto-instrumentation.

    OTEL_SERVICE_NAME=auto-app opentelemetry-instrument python examples/auto_app.py

`opentelemetry-instrument` finds otel-gil through its `opentelemetry_instrumentor`
entry point and calls `otel_gil.instrument()`; the GIL waits of these threads
then show up as `gil.wait` spans under their `work-N` spans.

The sidecar takes a few seconds to start (it compiles its BPF program), and
instrument() never makes the app wait for it: so the threads run ten rounds of
one-second spans, and the spans that begin once it traces get their waits.
"""

import threading
import time

from opentelemetry import trace

tracer = trace.get_tracer("auto-app")


def burn(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(i * i for i in range(300))


def work(name: str) -> None:
    for _ in range(10):
        with tracer.start_as_current_span(name):
            burn(1.0)


threads = [threading.Thread(target=work, args=(f"work-{i}",)) for i in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
