"""An OpenTelemetry-instrumented app with GIL contention, traced by otel-gil.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 python examples/traced_app.py

One thread burns CPU inside its own span ("hog"); several threads serve short
requests, each in a "request" span, that must wait for the GIL behind it; one
thread serves requests under an unsampled parent. `otel_gil.instrument()` is the
only otel-gil line; the rest is ordinary OpenTelemetry.

Prints one JSON line when tracing is live, and one at the end describing its
threads (native ids, idents, names), so tests can check the exported spans.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import otel_gil


def burn(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(i * i for i in range(500))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--requesters", type=int, default=3)
    args = parser.parse_args()

    provider = TracerProvider(resource=Resource.create({"service.name": "gil-example"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("example")

    threads_info = {}
    stop = 0.0

    def describe(role: str, trace_ids: list) -> None:
        threads_info[threading.current_thread().name] = {
            "role": role, "native_id": threading.get_native_id(),
            "ident": threading.get_ident(), "trace_ids": trace_ids}

    def hog() -> None:
        with tracer.start_as_current_span("hog") as span:
            describe("hog", [f"{span.get_span_context().trace_id:032x}"])
            burn(args.seconds + 3)  # outlasts the requests, whatever the attach time

    def requester(sampled: bool) -> None:
        trace_ids = []
        parent = None
        if not sampled:
            parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                0x1234567890ABCDEF1234567890ABCDEF, 0x1234567890ABCDEF, is_remote=True,
                trace_flags=TraceFlags(0))))
        while time.monotonic() < stop:
            with tracer.start_as_current_span("request", context=parent) as span:
                trace_ids.append(f"{span.get_span_context().trace_id:032x}")
                # Light work: the requesters together want a fraction of the GIL,
                # so a request mostly waits behind the hog, not behind each other.
                burn(0.0005)
                time.sleep(0.001)
            time.sleep(0.005)
        describe("request" if sampled else "unsampled", trace_ids)

    otel_gil.instrument()
    # The hog enters its span before the sidecar is attached: its waits must
    # still be parented correctly (the context table is written from instrument()).
    hog_thread = threading.Thread(target=hog, name="hog")
    hog_thread.start()
    live = otel_gil.wait_until_live(30)
    print(json.dumps({"pid": os.getpid(), "live": live, "status": otel_gil.status()}),
          flush=True)
    stop = time.monotonic() + args.seconds
    threads = [threading.Thread(target=requester, args=(True,), name=f"request-{i}")
               for i in range(args.requesters)]
    threads.append(threading.Thread(target=requester, args=(False,), name="unsampled"))
    for t in threads:
        t.start()
    for t in [hog_thread, *threads]:
        t.join()
    provider.shutdown()
    print(json.dumps({"threads": threads_info}), flush=True)


if __name__ == "__main__":
    main()
