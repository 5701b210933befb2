"""Eight asyncio tasks on one event loop, each in its own span, and a thread that
holds the GIL in 3 ms C calls: where do the loop thread's GIL waits go?

    python examples/asyncio_tasks.py [--loops asyncio,uvloop] [--seconds 1.5]

Each task alternates a short CPU burst with a 1 ms sleep (asyncio.sleep's own
way, see sleep());
the "holder" thread, in its own span, calls libc usleep(3000) through
ctypes.PyDLL, which keeps the GIL (PyDLL never releases it). A switch interval
of 0.2 ms makes each thread ask the other for the GIL soon after it begins
waiting, so the loop thread waits both in task steps (forced off mid-burst)
and in the loop's own code (coming back from epoll_wait). The program
records, in wall-clock ns, every window in which code ran in a task's Context
(from the task's resumption to its next await, and the sleep's wake-up
callback) with the task's span id, and prints one JSON line
at the end: its spans, those windows, and its thread ids. Each loop runs inside
a span of its own, so that waits in the loop's own code between steps (charged
to no task) are exported under that span and can be checked too; asyncio's
loop gets a selector that records its select() calls. With --loops
asyncio,uvloop it runs one phase per loop, one after the other.

Runs on Python 3.8+ with opentelemetry-sdk (and uvloop for its phase); the
spans are not exported, the test reads them from the JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import selectors
import sys
import threading
import time
from typing import Any, Dict, List

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import otel_gil

TASKS = 8
BURST_S = 0.0004


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: List[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def burn(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sum(i * i for i in range(200))


def wake(future: asyncio.Future, span_id: str, windows: List[Any]) -> None:
    start = time.time_ns()
    if not future.cancelled():
        future.set_result(None)
    windows.append((span_id, start, time.time_ns()))


async def sleep(delay: float, span_id: str, start: int, windows: List[Any]) -> None:
    """asyncio.sleep(delay) (Lib/asyncio/tasks.py: a future, and a call_later
    callback that runs in a copy of the task's Context and resolves it), with
    that callback's window recorded too: its code runs in the task's Context.
    The step's window, from ``start``, ends as late as it can: at the await."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    handle = loop.call_later(delay, wake, future, span_id, windows)
    try:
        windows.append((span_id, start, time.time_ns()))
        await future
    finally:
        handle.cancel()


async def task(tracer: trace.Tracer, name: str, deadline: float, windows: List[Any]) -> None:
    # The first step starts in the Context the task was created in (its
    # parent's span) and the last ends there: windows are only what runs in
    # the task's own span.
    with tracer.start_as_current_span(name) as span:
        span_id = f"{span.get_span_context().span_id:016x}"
        start = time.time_ns()
        while time.monotonic() < deadline:
            burn(BURST_S)
            await sleep(0.001, span_id, start, windows)
            start = time.time_ns()
        windows.append((span_id, start, time.time_ns()))


async def phase(tracer: trace.Tracer, loop_name: str, seconds: float,
                windows: List[Any]) -> None:
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(task(tracer, f"{loop_name}-task-{i}", deadline, windows)
                           for i in range(TASKS)))


class Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Records every select() call of asyncio's loop: its own code, between
    steps. select() releases the GIL in epoll_wait and takes it back before
    it returns, so the GIL waits after epoll begin inside these windows."""

    def __init__(self, windows: List[Any]) -> None:
        super().__init__()
        self.windows = windows

    def select(self, timeout: Any = None) -> Any:
        start = time.time_ns()
        try:
            return super().select(timeout)
        finally:
            self.windows.append((start, time.time_ns()))


def run_phase(tracer: trace.Tracer, loop_name: str, seconds: float) -> Dict[str, Any]:
    """One phase, its loop run inside a span of its own ("<loop>-loop"), so
    that waits in the loop's own code are exported under it, not dropped."""
    windows: List[Any] = []
    selects: List[Any] = []
    if loop_name == "uvloop":
        import uvloop  # noqa: PLC0415 - only for its phase

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.SelectorEventLoop(Selector(selects))
    with tracer.start_as_current_span(f"{loop_name}-loop"):
        loop.run_until_complete(phase(tracer, loop_name, seconds, windows))
    loop.close()
    return {"tasks": windows, "selects": selects}


def holder(tracer: trace.Tracer, stop: threading.Event, info: Dict[str, Any]) -> None:
    usleep = ctypes.PyDLL(None).usleep  # PyDLL: the GIL stays held during the call
    usleep.argtypes = [ctypes.c_uint]
    info["holder_tid"] = threading.get_native_id()
    with tracer.start_as_current_span("holder"):
        while not stop.is_set():
            usleep(3000)


def write_line(text: str) -> None:
    """One line on stdout, whole: an unbuffered stdout (-u, PYTHONUNBUFFERED)
    can cut a long print() to a pipe after a partial write."""
    data = (text + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", default="asyncio")
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    keep = Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "asyncio-tasks"}))
    provider.add_span_processor(SimpleSpanProcessor(keep))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("asyncio-tasks")

    sys.setswitchinterval(0.0002)
    otel_gil.instrument()
    live = otel_gil.wait_until_live(60)
    info: Dict[str, Any] = {"pid": os.getpid(), "live": live, "status": otel_gil.status(),
                            "loop_tid": threading.get_native_id(), "windows": {}}
    stop = threading.Event()
    hold = threading.Thread(target=holder, args=(tracer, stop, info), name="holder")
    hold.start()
    for loop_name in args.loops.split(","):
        info["windows"][loop_name] = run_phase(tracer, loop_name, args.seconds)
    stop.set()
    hold.join()
    info["spans"] = [{"name": s.name, "span_id": f"{s.context.span_id:016x}",
                      "trace_id": f"{s.context.trace_id:032x}",
                      "start": s.start_time, "end": s.end_time} for s in keep.spans]
    write_line(json.dumps(info))


if __name__ == "__main__":
    main()
