"""A FastAPI service with GIL contention, for otel-gil under uvicorn with no
code change:

    opentelemetry-instrument uvicorn fastapi_app:app --app-dir examples [--loop uvloop]

- ``GET /async``: an async endpoint; a 6 ms CPU burst on the event loop
  (longer than the 5 ms switch interval, so a waiting thread forces it off).
- ``GET /sync``: a sync endpoint, which FastAPI runs in anyio's thread pool;
  a 2 ms CPU burst there.
- ``GET /cpu``: a sync endpoint burning 20 ms of CPU: the contention.
- ``GET /windows``: what each request recorded of itself: its trace and server
  span, the thread that ran the endpoint, and the window of its burst.

There is no otel-gil code here: the ``gil`` instrumentor is found through its
entry point, as FastAPI's is.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

from fastapi import FastAPI
from opentelemetry import trace

app = FastAPI()
WINDOWS: List[Dict[str, Any]] = []


def burn(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sum(i * i for i in range(200))


def work(kind: str, seconds: float) -> Dict[str, Any]:
    start = time.time_ns()
    burn(seconds)
    span = trace.get_current_span().get_span_context()  # the request's server span
    window = {"kind": kind, "trace_id": f"{span.trace_id:032x}",
              "span_id": f"{span.span_id:016x}", "tid": threading.get_native_id(),
              "start": start, "end": time.time_ns()}
    WINDOWS.append(window)
    return window


@app.get("/async")
async def async_endpoint() -> Dict[str, Any]:
    return work("async", 0.006)


@app.get("/sync")
def sync_endpoint() -> Dict[str, Any]:
    return work("sync", 0.002)


@app.get("/cpu")
def cpu_endpoint() -> Dict[str, Any]:
    return work("cpu", 0.02)


@app.get("/windows")
async def windows() -> List[Dict[str, Any]]:
    return WINDOWS
