"""Turning GIL intervals into spans in the app's own traces (runs in the sidecar).

A `gil.wait` span is a child of the span that was active on the waiting thread
when the wait began (a remote, sampled parent), with the wait's kernel
timestamps converted to the wall clock, and links to the spans the holders
were in. Long holds become `gil.hold` spans in the holder's trace. Nothing is
emitted under an unsampled parent, and waits outside any span are counted,
not exported (they would arrive as orphans).

Each traced process gets its own TracerProvider carrying the app's resource,
so the spans land in the app's service in Jaeger or Tempo.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

from otel_gil import names, otlp, timeline
from otel_gil.clock import Clock
from otel_gil.events import Interval, SpanRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadInfo:
    host_tid: int
    ns_tid: int
    name: str
    ident: Optional[int] = None  # Python thread ident, when the app published it


@dataclass
class ProcessExport:
    """One traced process: its provider, identity, and a thread directory."""

    pid: int
    ns_pid: int
    provider: TracerProvider
    tracer: Any
    threads: "ThreadDirectory"


@dataclass
class ExportCounters:
    waits_exported: int = 0
    holds_exported: int = 0
    waits_outside_span: int = 0
    waits_unsampled: int = 0
    holds_outside_span: int = 0
    holds_unsampled: int = 0
    holds_across_spans: int = 0


def default_exporter() -> SpanExporter:
    """OTLP, honouring OTEL_EXPORTER_OTLP_* (protocol grpc, or http/protobuf)."""
    exporter: SpanExporter = otlp.exporter("traces")
    return exporter


def _parent(ref: SpanRef) -> Any:
    ctx = SpanContext(ref.trace_id, ref.span_id, is_remote=True,
                      trace_flags=TraceFlags(ref.trace_flags))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


class SpanExport:
    def __init__(self, clock: Clock,
                 exporter_factory: Callable[[], SpanExporter] = default_exporter) -> None:
        self.clock = clock
        self.counters = ExportCounters()
        self._exporter_factory = exporter_factory
        self._processes: Dict[int, ProcessExport] = {}

    def add_process(self, pid: int, ns_pid: int, resource: Mapping[str, Any],
                    threads: "ThreadDirectory") -> None:
        provider = TracerProvider(resource=Resource.create(dict(resource)))
        provider.add_span_processor(BatchSpanProcessor(self._exporter_factory(),
                                                       schedule_delay_millis=500))
        tracer = provider.get_tracer(names.INSTRUMENTATION_SCOPE)
        self._processes[pid] = ProcessExport(pid, ns_pid, provider, tracer, threads)

    def thread(self, pid: int, tid: int) -> Optional[ThreadInfo]:
        proc = self._processes.get(pid)
        return proc.threads(tid) if proc is not None else None

    def remove_process(self, pid: int) -> None:
        proc = self._processes.pop(pid, None)
        if proc is not None:
            proc.provider.shutdown()  # flushes

    def flush(self) -> None:
        for proc in self._processes.values():
            proc.provider.force_flush()

    def close(self) -> None:
        for pid in list(self._processes):
            self.remove_process(pid)

    def on_interval(self, iv: Interval) -> Optional[SpanContext]:
        """Export one interval; returns the new span's context (None: not exported)."""
        proc = self._processes.get(iv.pid)
        if proc is None:
            return None
        if iv.kind == "wait":
            return self._wait(proc, iv)
        return self._hold(proc, iv)

    def _common(self, proc: ProcessExport, thread: ThreadInfo, iv: Interval) -> Dict[str, Any]:
        attrs: Dict[str, Any] = {
            names.THREAD_NAME.name: thread.name,
            names.THREAD_NATIVE_ID.name: thread.ns_tid,
            names.THREAD_HOST_ID.name: thread.host_tid,
            names.PROCESS_PID.name: proc.ns_pid,
            names.PROCESS_HOST_PID.name: proc.pid,
            names.CLOCK_UNCERTAINTY_NS.name: self.clock.offset_at(iv.start_ns).uncertainty_ns,
        }
        if thread.ident is not None:
            attrs[names.THREAD_ID.name] = thread.ident
        return attrs

    def _emit(self, proc: ProcessExport, name: str, parent: SpanRef, iv: Interval,
              attrs: Dict[str, Any], links: List[Link]) -> SpanContext:
        span = proc.tracer.start_span(
            name, context=_parent(parent), kind=trace.SpanKind.INTERNAL,
            start_time=self.clock.to_realtime(iv.start_ns), attributes=attrs, links=links)
        span.end(end_time=self.clock.to_realtime(iv.end_ns))
        return span.get_span_context()  # type: ignore[no-any-return]

    def _wait(self, proc: ProcessExport, iv: Interval) -> Optional[SpanContext]:
        if iv.span is None:
            self.counters.waits_outside_span += 1
            return None
        if not iv.span.sampled:
            self.counters.waits_unsampled += 1
            return None
        attrs = self._common(proc, proc.threads(iv.tid, published=True), iv)
        attrs[names.WAIT_NS.name] = iv.duration_ns
        blame = timeline.blame(iv)
        holders = [(b, proc.threads(b.tid)) for b in blame]
        attrs[names.HOLDER_TIDS.name] = [b.tid for b, _ in holders]
        attrs[names.HOLDER_NAMES.name] = [t.name for _, t in holders]
        attrs[names.HOLDER_HELD_NS.name] = [b.held_ns for b, _ in holders]
        attrs[names.HOLDERS_TRUNCATED.name] = timeline.holds_truncated(iv)
        self.counters.waits_exported += 1
        return self._emit(proc, names.GIL_WAIT.name, iv.span, iv, attrs, _holder_links(iv))

    def _hold(self, proc: ProcessExport, iv: Interval) -> Optional[SpanContext]:
        if iv.span is None:
            self.counters.holds_outside_span += 1
            return None
        if not iv.span.sampled:
            self.counters.holds_unsampled += 1
            return None
        if iv.span_changed:
            # It began under another span: no single span contains it, so it
            # is not exported (it stays in the metrics).
            self.counters.holds_across_spans += 1
            return None
        attrs = self._common(proc, proc.threads(iv.tid, published=True), iv)
        attrs[names.HOLD_NS.name] = iv.duration_ns
        self.counters.holds_exported += 1
        return self._emit(proc, names.GIL_HOLD.name, iv.span, iv, attrs, [])


def _holder_links(iv: Interval) -> List[Link]:
    """One link per distinct sampled span a holder was in, with how long it held."""
    held: Dict[Tuple[int, int], Tuple[SpanRef, int]] = {}
    for h in iv.holds:
        if h.span is None or not h.span.sampled or h.tid == iv.tid:
            continue
        overlap = min(h.end_ns, iv.end_ns) - max(h.start_ns, iv.start_ns)
        if overlap <= 0:
            continue
        key = (h.span.trace_id, h.span.span_id)
        prev = held.get(key)
        held[key] = (h.span, overlap + (prev[1] if prev else 0))
    out = []
    for ref, ns in sorted(held.values(), key=lambda x: -x[1]):
        ctx = SpanContext(ref.trace_id, ref.span_id, is_remote=True,
                          trace_flags=TraceFlags(ref.trace_flags))
        out.append(Link(ctx, {names.LINK_ROLE.name: "holder", names.LINK_HELD_NS.name: ns}))
    return out


@dataclass
class ThreadDirectory:
    """Thread identities of one process: the app's context table when it has one
    (Python ident and thread name), else /proc (OS name). A thread not (yet)
    found in the table is looked up again after RETRY_NS, not on every span."""

    RETRY_NS = 50_000_000

    lookup: Callable[[int, bool], ThreadInfo]  # (host tid, known to be published)
    cache: Dict[int, Tuple[ThreadInfo, int]] = field(default_factory=dict)

    def __call__(self, host_tid: int, published: bool = False) -> ThreadInfo:
        """published: the thread is known to have a slot (its span came from it),
        so a cached miss is stale: look again now."""
        now = time.monotonic_ns()
        hit = self.cache.get(host_tid)
        if hit is not None and (hit[0].ident is not None or
                                (not published and now - hit[1] < self.RETRY_NS)):
            return hit[0]
        info = self.lookup(host_tid, published)
        self.cache[host_tid] = (info, now)
        return info
