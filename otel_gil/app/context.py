"""Publishing the active span of every thread, for the probes to read.

This module runs *inside the traced app* (Python 3.8+, opentelemetry-api and
the stdlib only). It must be cheap and must never raise into the app.

The app keeps a *context table* in its own memory (otel_gil/app/table.py; its
bytes are otel_gil/abi/slots.py's, ``struct ctx_slot_head`` in ``bpf/gil.h``).
A thread owns the slot for its native thread id; at every OpenTelemetry
``attach``/``detach`` it writes the now-current span context into it as an
OTEP 4947 thread-context record. Where the thread's contextvars Context changes
with no attach (an event loop switching tasks, a worker thread running a copied
context), otel_gil/app/event_loop.py calls publish_entered()/publish_current().
The eBPF probes read the calling thread's slot with ``bpf_probe_read_user`` at
GIL events; the sidecar reads the slots' thread names and the header's counters
(otel_gil/sidecar/threads.py).

The hot path itself (claiming a slot, caching span records, writing them) is
otel_gil/app/publish.py; here the hook that calls it at every attach/detach,
and install()/uninstall() for it and for the event-loop patches.

The app's resource is published separately, as an OTEP 4719 process context
(otel_gil/app/process_context.py).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any, Callable

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context, _RuntimeContext
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

# The key trace.get_current_span() looks up (opentelemetry-api >= 1.0, which
# pyproject requires at >= 1.20); reading it directly saves a call per switch.
from opentelemetry.trace.propagation import _SPAN_KEY

from otel_gil.abi.slots import INVALID
from otel_gil.app import event_loop, publish
from otel_gil.app.publish import (
    _cache,
    _claim_current,
    _failed,
    _publish,
    _remember,
    _tls,
    current_table,
    publish_current,
    publish_entered,
    span_ended,
    watch_span_ends,
)
from otel_gil.app.table import DEFAULT_SLOTS, ContextTable

__all__ = [
    "DEFAULT_SLOTS",
    "ContextTable",
    "current_table",
    "install",
    "publish_current",
    "publish_entered",
    "span_ended",
    "uninstall",
    "watch_span_ends",
]


class PublishingRuntimeContext(_RuntimeContext):
    """Delegates to the app's runtime context, then publishes the now-current span."""

    def __init__(self, inner: _RuntimeContext) -> None:
        self.inner = inner
        self.enabled = True
        var = getattr(inner, "_current_context", None)
        if type(inner) is ContextVarsRuntimeContext and isinstance(var, ContextVar):
            # The default runtime context is these three ContextVar calls
            # (opentelemetry/context/contextvars_context.py); calling them directly
            # saves a Python frame on each attach and detach.
            self._attach: Callable[[Context], Any] = var.set
            self._detach: Callable[[Any], None] = var.reset
            self._get: Callable[[], Context] = var.get
            self.var: ContextVar[Context] | None = var
        else:
            self._attach, self._detach, self._get = inner.attach, inner.detach, inner.get_current
            self.var = None

    # attach() and detach() inline _publish(): a Python call costs ~70 ns here,
    # a tenth of the budget (bench/context_switch.py).
    def attach(self, context: Context) -> Any:
        token = self._attach(context)
        if self.enabled:
            try:
                span: Any = context.get(_SPAN_KEY)
                if span is None:
                    record = INVALID
                else:
                    hit = _cache.get(id(span.get_span_context()))
                    record = hit[1] if hit is not None else _remember(span)
                try:
                    _tls.view[:] = record
                except AttributeError:
                    _claim_current()[:] = record
            except Exception:  # noqa: BLE001 - never raise into the app
                _failed()
        return token

    def get_current(self) -> Context:
        return self._get()

    def detach(self, token: Any) -> None:
        self._detach(token)
        if self.enabled:
            try:
                span: Any = self._get().get(_SPAN_KEY)
                if span is None:
                    record = INVALID
                else:
                    hit = _cache.get(id(span.get_span_context()))
                    record = hit[1] if hit is not None else _remember(span)
                try:
                    _tls.view[:] = record
                except AttributeError:
                    _claim_current()[:] = record
            except Exception:  # noqa: BLE001 - never raise into the app
                _failed()


def install(slots: int = DEFAULT_SLOTS) -> ContextTable:
    """Create the table (once per process), hook OpenTelemetry's runtime context
    and publish the calling thread's current context. Idempotent. Threads with a
    context attached before install() publish it at their next attach/detach."""
    if publish._table is None:
        publish._table = ContextTable(slots)
        os.register_at_fork(after_in_child=_after_fork)
    runtime = otel_context._RUNTIME_CONTEXT
    if isinstance(runtime, PublishingRuntimeContext):
        runtime.enabled = True
    else:
        runtime = otel_context._RUNTIME_CONTEXT = PublishingRuntimeContext(runtime)
    publish._otel_var = runtime.var
    _publish(otel_context.get_current())
    event_loop.install()
    return publish._table


def uninstall() -> None:
    """Put the original runtime context back and mark every record invalid. The
    table stays mapped (the sidecar may hold its address); install() reuses it.
    If something else wrapped our hook meanwhile, the hook turns pass-through."""
    event_loop.uninstall()
    runtime = otel_context._RUNTIME_CONTEXT
    if isinstance(runtime, PublishingRuntimeContext):
        otel_context._RUNTIME_CONTEXT = runtime.inner
        runtime.enabled = False
    else:
        _disable_nested(runtime)
    if publish._table is not None:
        publish._table.clear_valid()


def _disable_nested(runtime: object) -> None:
    seen = 0
    while runtime is not None and seen < 16:
        if isinstance(runtime, PublishingRuntimeContext):
            runtime.enabled = False
        runtime = getattr(runtime, "inner", getattr(runtime, "_inner", None))
        seen += 1


def _after_fork() -> None:
    """In a forked child only the forking thread exists, under a new tid: forget
    the parent's slots and let this thread claim afresh."""
    table = publish._table
    if table is None:
        return
    table.reset()
    for name in ("view", "lease"):
        _tls.__dict__.pop(name, None)
    _cache.clear()  # in place: otel_gil/app/event_loop.py holds this dict
    publish._ended.clear()
    if isinstance(otel_context._RUNTIME_CONTEXT, PublishingRuntimeContext):
        _publish(otel_context.get_current())
