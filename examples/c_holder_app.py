"""A C call that keeps the GIL, traced by otel-gil: who held it, doing what.

    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 python examples/c_holder_app.py

A "holder" thread calls hold_in_c(), which calls libc's usleep(300 ms) through
ctypes.PyDLL: a PyDLL call does not release the GIL, the way a C extension
without Py_BEGIN_ALLOW_THREADS does not. Meanwhile "request" threads, each in a
span, wait for the GIL behind it. otel-gil's gil.hold span (in the holder's
"holder" span) and the long gil.wait spans carry the holder's stack:
hold_in_c's file and line, and usleep.

Prints one JSON line when tracing is live, and one at the end with the line
of the usleep call (tests check the spans against it).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import inspect
import json
import os
import threading
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import otel_gil

LIBC = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6")  # PyDLL: keeps the GIL


def hold_in_c(microseconds: int) -> None:
    LIBC.usleep(microseconds)  # USLEEP_LINE: the GIL stays held for the whole sleep


def usleep_line() -> int:
    lines, first = inspect.getsourcelines(hold_in_c)
    return first + next(i for i, text in enumerate(lines) if "USLEEP_LINE" in text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--holds", type=int, default=3)
    parser.add_argument("--requesters", type=int, default=2)
    args = parser.parse_args()

    provider = TracerProvider(resource=Resource.create({"service.name": "gil-c-holder"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("example")
    done = threading.Event()

    def holder() -> None:
        with tracer.start_as_current_span("holder"):
            for _ in range(args.holds):
                hold_in_c(300_000)
                time.sleep(0.05)
        done.set()

    def requester() -> None:
        while not done.is_set():
            with tracer.start_as_current_span("request"):
                time.sleep(0.001)  # drops the GIL: taking it back waits, in the span
                sum(i * i for i in range(2000))

    otel_gil.instrument()
    live = otel_gil.wait_until_live(30)
    print(json.dumps({"pid": os.getpid(), "live": live}), flush=True)
    threads = [threading.Thread(target=requester, name=f"request-{i}")
               for i in range(args.requesters)]
    threads.append(threading.Thread(target=holder, name="holder"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    provider.shutdown()
    print(json.dumps({"usleep_line": usleep_line(), "file": os.path.abspath(__file__)}),
          flush=True)


if __name__ == "__main__":
    main()
