"""Turning GIL intervals into spans in the app's own traces (runs in the sidecar).

A `gil.wait` span is a child of the span that was active on the waiting thread
when the wait began (a remote, sampled parent), with the wait's kernel
timestamps converted to the wall clock, and links to the spans the holders
were in. Long holds become `gil.hold` spans in the holder's trace. Nothing is
emitted under an unsampled parent, and waits outside any span are not exported
(they would arrive as orphans): those are counted as skipped, by reason.

Each span carries its traced process's resource, so it lands in the app's
service in Jaeger or Tempo. Spans are encoded here (otel_gil/export/spanwire.py) and
handed to otel_gil/export/delivery.py, which exports them and counts what it cannot.
The child is sampled exactly when its parent is (parent-based, as the SDK's
default sampler would decide).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from otel_gil import names
from otel_gil.abi.events import Interval, SpanRef
from otel_gil.export import delivery, otlp, spanwire
from otel_gil.sidecar import stack_attrs as stack_export
from otel_gil.sidecar import timeline
from otel_gil.sidecar.clock import Clock
from otel_gil.sidecar.threads import ThreadDirectory, ThreadInfo

log = logging.getLogger("otel_gil.export")
LINK_CACHE_MAX = 4096
SAMPLED = 1  # W3C trace-flags

# Why an interval at or above its threshold did not become a span (by design).
OUTSIDE_SPAN, UNSAMPLED, ACROSS_SPANS = "outside_span", "unsampled", "across_spans"
SKIP_REASONS = (OUTSIDE_SPAN, UNSAMPLED, ACROSS_SPANS)

Counts = Dict[Tuple[int, str, str], int]  # (pid, span name, reason) -> intervals


@dataclass
class ProcessExport:
    """One traced process: its encoded resource, identity, and a thread directory."""

    pid: int
    ns_pid: int
    resource: delivery.Resource
    threads: ThreadDirectory


def default_exporter() -> SpanExporter:
    """OTLP, honouring OTEL_EXPORTER_OTLP_* (protocol grpc, or http/protobuf)."""
    exporter: SpanExporter = otlp.exporter("traces")
    return exporter


HOLDER_LINK = spanwire.LinkEncoder({names.LINK_ROLE.name: "holder"}, names.LINK_HELD_NS.name)


def export_name(iv: Interval) -> str:
    """The span an interval would become."""
    return names.GIL_WAIT.name if iv.kind == "wait" else names.GIL_HOLD.name


def _span_id() -> int:
    """A random non-zero span id, as the SDK's RandomIdGenerator makes them."""
    while True:
        span_id = random.getrandbits(64)
        if span_id:
            return span_id


class SpanExport:
    def __init__(self, clock: Clock,
                 exporter_factory: Callable[[], SpanExporter] = default_exporter,
                 spans: Optional[delivery.SpanDelivery] = None) -> None:
        self.clock = clock
        self.spans = spans if spans is not None else delivery.SpanDelivery(exporter_factory)
        self.skipped: Counts = {}
        self._processes: Dict[int, ProcessExport] = {}
        self._links: Dict[Tuple[int, int, int], bytes] = {}
        self._common_attrs: Dict[int, Tuple[ThreadInfo, int, bytes]] = {}
        # Waits at or above this carry their holder's stack (ProbeConfig.stack_threshold_ns).
        self.stack_threshold_ns = stack_export.DEFAULT_STACK_THRESHOLD_NS

    def seen(self, iv: Interval) -> None:
        """An interval just arrived: its thread is looked up while it lives."""
        proc = self._processes.get(iv.pid)
        if proc is not None:
            proc.threads.remember(iv.tid)
            for hold in iv.holds:  # the holders, named on the links
                proc.threads.remember(hold.tid)

    def add_process(self, pid: int, ns_pid: int, resource: Mapping[str, Any],
                    threads: ThreadDirectory) -> None:
        # Resource.create adds the SDK's defaults and OTEL_RESOURCE_ATTRIBUTES,
        # as a TracerProvider(resource=...) in the sidecar would.
        res = Resource.create(dict(resource))
        encoded = delivery.Resource(pid, spanwire.encode_resource(res.attributes),
                                    res.schema_url or "")
        self._processes[pid] = ProcessExport(pid, ns_pid, encoded, threads)

    def remove_process(self, pid: int) -> None:
        """Forget a process; its spans still queued keep their resource and go out."""
        self._processes.pop(pid, None)

    def close(self) -> None:
        self._processes.clear()
        self.spans.close()

    def on_interval(self, iv: Interval) -> Optional[SpanRef]:
        """Export one interval; returns the new span's ids (None: not exported)."""
        proc = self._processes.get(iv.pid)
        if proc is None:
            return None
        if iv.kind == "wait":
            return self._wait(proc, iv)
        return self._hold(proc, iv)

    def _skipped_for_parent(self, iv: Interval, name: str) -> bool:
        """No span to parent it (outside_span), or an unsampled one: counted, skipped."""
        if iv.span is None or not iv.span.sampled:
            self._skip(iv.pid, name, OUTSIDE_SPAN if iv.span is None else UNSAMPLED)
            return True
        return False

    def _skip(self, pid: int, name: str, reason: str) -> None:
        key = (pid, name, reason)
        self.skipped[key] = self.skipped.get(key, 0) + 1

    def skip_unparented_wait(self, pid: int, in_span: bool) -> None:
        """A wait the probes saw under no sampled span, counted undecoded
        (Probes.on_unparented): what _skipped_for_parent would have said."""
        if pid in self._processes:
            self._skip(pid, names.GIL_WAIT.name, UNSAMPLED if in_span else OUTSIDE_SPAN)

    def _common(self, proc: ProcessExport, thread: ThreadInfo, iv: Interval) -> bytes:
        """The attributes every span of a thread shares, encoded once per thread
        (and clock calibration): they are most of a hold span's attributes."""
        uncertainty = self.clock.offset_at(iv.start_ns).uncertainty_ns
        hit = self._common_attrs.get(thread.host_tid)
        if hit is not None and hit[0] is thread and hit[1] == uncertainty:
            return hit[2]
        if len(self._common_attrs) >= LINK_CACHE_MAX:
            self._common_attrs.clear()
        encoded = spanwire.encode_attributes(self._common_dict(proc, thread, uncertainty))
        self._common_attrs[thread.host_tid] = (thread, uncertainty, encoded)
        return encoded

    def _common_dict(self, proc: ProcessExport, thread: ThreadInfo,
                     uncertainty: int) -> Dict[str, Any]:
        attrs: Dict[str, Any] = {
            names.THREAD_NAME.name: thread.name,
            names.THREAD_NATIVE_ID.name: thread.ns_tid,
            names.THREAD_HOST_ID.name: thread.host_tid,
            names.PROCESS_PID.name: proc.ns_pid,
            names.PROCESS_HOST_PID.name: proc.pid,
            names.CLOCK_UNCERTAINTY_NS.name: uncertainty,
        }
        if thread.ident is not None:
            attrs[names.THREAD_ID.name] = thread.ident
        return attrs

    def _link(self, trace_id: int, span_id: int, held_ns: int) -> bytes:
        """A holder link, encoded; cached: a hold inside several concurrent waits
        is the same link (same span, same held_ns) in each of them."""
        key = (trace_id, span_id, held_ns)
        link = self._links.get(key)
        if link is None:
            if len(self._links) >= LINK_CACHE_MAX:
                self._links.clear()
            link = self._links[key] = HOLDER_LINK.encode(trace_id, span_id, held_ns)
        return link

    def _emit(self, proc: ProcessExport, name: str, parent: SpanRef, iv: Interval,
              common: bytes, attrs: Dict[str, Any], links: List[bytes]) -> Optional[SpanRef]:
        span = spanwire.SpanData(
            name=name, trace_id=parent.trace_id, span_id=_span_id(),
            parent_span_id=parent.span_id, start_ns=self.clock.to_realtime(iv.start_ns),
            end_ns=self.clock.to_realtime(iv.end_ns), attributes=attrs, links=links,
            encoded_attributes=common)
        if not self.spans.submit(delivery.Queued(proc.resource, name, span.encode())):
            return None  # dropped (queue full) and counted: no exemplar for it
        return SpanRef(span.trace_id, span.span_id, SAMPLED)

    def _wait(self, proc: ProcessExport, iv: Interval) -> Optional[SpanRef]:
        name = names.GIL_WAIT.name
        if self._skipped_for_parent(iv, name) or iv.span is None:
            return None
        common = self._common(proc, proc.threads(iv.tid, published=True), iv)
        blame, links = timeline.holders_of(iv)
        attrs = {names.WAIT_NS.name: iv.duration_ns,
                 names.HOLDER_TIDS.name: [tid for tid, _ in blame],
                 names.HOLDER_NAMES.name: proc.threads.names([tid for tid, _ in blame]),
                 names.HOLDER_HELD_NS.name: [ns for _, ns in blame],
                 names.HOLDERS_TRUNCATED.name: timeline.holds_truncated(iv)}
        if iv.stacks:  # holder stacks (otel_gil/sidecar/stack_attrs.py)
            attrs.update(stack_export.wait_attributes(iv, self.stack_threshold_ns))
            return self._emit(proc, name, iv.span, iv, common, attrs, [
                HOLDER_LINK.encode(t, s, ns, stack_export.link_extra(iv, t, s))
                for t, s, ns in links])
        return self._emit(proc, name, iv.span, iv, common, attrs,
                          [self._link(*x) for x in links])

    def _hold(self, proc: ProcessExport, iv: Interval) -> Optional[SpanRef]:
        name = names.GIL_HOLD.name
        if self._skipped_for_parent(iv, name) or iv.span is None:
            return None
        if iv.span_changed:
            # It began under another span: no single span contains it, so it
            # is not exported (it stays in the metrics).
            self._skip(iv.pid, name, ACROSS_SPANS)
            return None
        common = self._common(proc, proc.threads(iv.tid, published=True), iv)
        attrs = {names.HOLD_NS.name: iv.duration_ns}
        if iv.stacks:
            attrs.update(stack_export.hold_attributes(iv))
        return self._emit(proc, name, iv.span, iv, common, attrs, [])
