"""The hot path: a thread's current span, written into its slot of the context table.

This module runs *inside the traced app* (Python 3.8+, opentelemetry-api and
the stdlib only). It must be cheap and must never raise into the app.

A thread's first write claims its slot (otel_gil/app/table.py) and keeps a
view of its 26-byte id record in a thread-local; every later write is one
slice assignment. Span records are cached per SpanContext. The callers are
otel_gil/app/context.py's runtime-context wrapper (every attach/detach) and
otel_gil/app/event_loop.py's patches (a task step, a worker's copied context);
context.install() sets _table and _otel_var here.
"""

from __future__ import annotations

import contextvars
import threading
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context

# The key trace.get_current_span() looks up (opentelemetry-api >= 1.0, which
# pyproject requires at >= 1.20); reading it directly saves a call per switch.
from opentelemetry.trace.propagation import _SPAN_KEY

from otel_gil.abi.slots import IDS_SIZE, INVALID, ids_record
from otel_gil.app.table import ContextTable

_EMPTY = Context()  # an OpenTelemetry Context with no span


_table: ContextTable | None = None
_tls = threading.local()  # .view: the thread's record (see ContextTable.view); .lease
# id(SpanContext) -> (that SpanContext, record): one dict, so that no other
# thread can ever see it half updated (a clear between two dicts once left an
# ended span cached as live). An SDK span returns the SpanContext it was made
# with, and so does the ReadableSpan its span processors get at its end
# (span_ended), so both find the same entry. The entry keeps that SpanContext
# alive, so no other object can have its id meanwhile: a hit is always the
# span's own. The span itself is not kept: 256 spans (each a graph of
# attributes, events, links, locks) kept alive a little longer are promoted
# through the GC's generations, which cost the app several µs per new span
# (bench/span_cost.py); a SpanContext is one small tuple. Cleared past _CACHE_MAX.
_cache: dict[int, tuple[object, bytes]] = {}
# id(SpanContext) -> that SpanContext, of spans that have ended (span_ended),
# apart from _cache and its clears: another span object sharing an ended one's
# SpanContext (the SDK's disabled tracer returns NonRecordingSpan(parent's
# context)) must not make an entry live again once the ended one's entry is
# cleared. It only ever says "ended", so no race can make a span live through it.
_ended: dict[int, object] = {}
_ENDED_MAX = 1024
_CACHE_MAX = 256
# The ContextVar that holds OpenTelemetry's current Context in each contextvars
# Context (ContextVarsRuntimeContext._current_context), or None when the app
# uses another runtime context: then a Context about to be entered cannot be
# read, and publish_entered() publishes "no span" rather than guess.
_otel_var: ContextVar[Context] | None = None


def _claim_current() -> memoryview:
    table = _table
    if table is None:
        return memoryview(bytearray(IDS_SIZE))
    lease = table.claim(threading.get_native_id(), threading.get_ident(),
                        threading.current_thread().name)
    view = table.view(lease)
    _tls.lease = lease
    _tls.view = view
    return view


def _remember(span: Any) -> bytes:
    span_context = span.get_span_context()
    # An SDK span that has ended publishes "no span": work after its end
    # (an ASGI server span ends when the response is sent, and stays current
    # while the middleware finishes) would otherwise get a child outside it.
    key = id(span_context)
    live = (span_context.is_valid and getattr(span, "end_time", None) is None
            and key not in _ended)
    record = ids_record(span_context.trace_id, span_context.span_id,
                        int(span_context.trace_flags)) if live else INVALID
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = (span_context, record)
    if live and (getattr(span, "end_time", None) is not None or key in _ended):
        # It ended on another thread since the check above, and span_ended
        # may have run before the entry was there: the SDK sets end_time
        # before it calls span processors, so this second look cannot miss it.
        # (A thread that read a live hit just before the end still writes it
        # to its own slot: that slot says so until the thread's next switch.)
        record = INVALID
        _cache[key] = (span_context, record)
    return record


def span_ended(span: Any) -> None:
    """A span ended on this thread (the SDK calls span processors' on_end
    there, inside Span.end): if it is cached, it publishes "no span" from then
    on; if it is this thread's published span, its slot says so now. Never raises."""
    try:
        span_context = span.get_span_context()
        key = id(span_context)
        if _ended.get(key) is span_context:
            return  # marked already: Span.end marks it, then its processor sees it again
        if len(_ended) >= _ENDED_MAX:
            _ended.clear()
        _ended[key] = span_context
        if key in _cache:
            _cache[key] = (span_context, INVALID)
        span_id = span_context.span_id
        view = getattr(_tls, "view", None)
        if view is not None and view[24] and bytes(view[16:24]) == span_id.to_bytes(8, "big"):
            view[:] = INVALID
    except Exception:  # noqa: BLE001 - never raise into the app
        _failed()


def _ended_spans_processor() -> Any:
    """An SDK SpanProcessor (a subclass, so that hooks newer SDKs call, such as
    _on_ending, keep their defaults) calling span_ended(). The hot path pays
    nothing for it; each span end pays one dict lookup."""
    from opentelemetry.sdk.trace import SpanProcessor  # noqa: PLC0415

    class EndedSpans(SpanProcessor):
        def on_end(self, span: Any) -> None:
            span_ended(span)

    return EndedSpans()


_ended_spans_on: set[int] = set()  # id() of the tracer providers given an EndedSpans


def _mark_before_the_end_time() -> None:
    """Have the SDK's Span.end call span_ended() first (once). A processor's
    on_end comes after Span.end set the end time and built the ReadableSpan:
    a GIL wait that began in between (a forced switch lands at any bytecode)
    was a child of a span that had ended before it began."""
    from opentelemetry.sdk.trace import Span  # noqa: PLC0415

    original = Span.__dict__.get("end")
    if original is None or getattr(original, "_otel_gil", False):
        return

    def end(self: Any, end_time: Any = None) -> Any:
        span_ended(self)
        return original(self, end_time)

    end._otel_gil = True  # type: ignore[attr-defined]
    setattr(Span, "end", end)  # noqa: B010


def watch_span_ends(tracer_provider: Any) -> None:
    """Give an SDK tracer provider a span processor calling span_ended() (once;
    default: the global one), and the SDK's Span.end a call to it before the
    end time is set. Other providers have no such hook: their ended spans keep
    publishing while they stay current."""
    try:
        _mark_before_the_end_time()
    except Exception:  # noqa: BLE001, S110 - optional: the processor still marks ends
        pass
    try:
        if tracer_provider is None:
            from opentelemetry import trace  # noqa: PLC0415

            tracer_provider = trace.get_tracer_provider()
        add = getattr(tracer_provider, "add_span_processor", None)
        if add is not None and id(tracer_provider) not in _ended_spans_on:
            add(_ended_spans_processor())
            _ended_spans_on.add(id(tracer_provider))
    except Exception:  # noqa: BLE001, S110 - optional: publishing works without it
        pass


def _publish(context: Context) -> None:
    """Write the calling thread's record for ``context``. Never raises.

    No reader can see a torn record: only the owning thread writes its slot,
    the probes read a slot only from that same thread (at a GIL event on it),
    and the write is one C call (a memoryview slice assignment: one memcpy,
    like one struct.pack_into but cheaper to call) made while holding the GIL,
    during which that thread reaches no GIL event.

    PublishingRuntimeContext.attach/detach inline this body."""
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


def _failed() -> None:
    """Count a hot-path failure and publish "no context" rather than a stale one."""
    try:
        if _table is not None:
            _table.errors += 1
        _tls.view[:] = INVALID
    except Exception:  # noqa: BLE001, S110 - never raise into the app
        pass


def publish_entered(entered: contextvars.Context) -> None:
    """Publish the span current in ``entered``: a contextvars Context that this
    thread is about to run code in with no OpenTelemetry attach (an event-loop
    step, a worker thread's copied context; otel_gil/app/event_loop.py). Never raises."""
    try:
        var = _otel_var
        otel = entered.get(var) if var is not None else None
        span: Any = otel.get(_SPAN_KEY) if otel is not None else None
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


def publish_current(claim: bool = True) -> None:
    """Publish the span current in this thread's current contextvars Context
    again (a step ended: the loop's own code runs on). With claim=False, a
    thread that has no slot yet is left without one (a pool thread that never
    published has nothing stale to correct). Never raises."""
    if not claim and getattr(_tls, "view", None) is None:
        return
    var = _otel_var
    if var is not None:
        otel = var.get(None)
        _publish(otel if otel is not None else _EMPTY)
    else:
        try:
            _publish(otel_context.get_current())
        except Exception:  # noqa: BLE001 - never raise into the app
            _failed()


def current_table() -> ContextTable | None:
    return _table
