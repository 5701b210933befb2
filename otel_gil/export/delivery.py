"""Delivering the sidecar's spans: a bounded queue, one export thread, and a count
of every span that did not make it (runs in the sidecar).

The sidecar decides which intervals become spans (otel_gil/sidecar/spans.py); from
then on each span is either delivered or counted as dropped, by reason:

  queue_full     the queue was at its byte bound when the span arrived
  export_failed  the exporter gave up on the batch (endpoint down, refused, an error)
  timeout        the exporter gave up waiting for an answer (its error says
                 so: DEADLINE_EXCEEDED, timed out): a black-holed endpoint
  shutdown       still queued when the sidecar exited and its last flush ran out of time

The queue is bounded in bytes of encoded spans, so a dead endpoint costs at most
that much memory; it drains again once the endpoint answers. One queue and one
exporter serve every traced process: spans carry their process's resource.

The exporter is the SDK's OTLP exporter (grpc or http/protobuf, configured by
OTEL_EXPORTER_OTLP_*), fed the request bytes of otel_gil/export/spanwire.py through a
narrow hook (see Transport); any other SpanExporter gets SDK ReadableSpans
decoded from the same bytes. Its log lines are captured, not printed: the
sidecar summarises losses at most once a minute (otel_gil/sidecar/losses.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otel_gil.export import spanwire

log = logging.getLogger("otel_gil.delivery")

EXPORTED = "exported"
QUEUE_FULL, EXPORT_FAILED, TIMEOUT, SHUTDOWN = "queue_full", "export_failed", "timeout", "shutdown"
DROP_REASONS = (QUEUE_FULL, EXPORT_FAILED, TIMEOUT, SHUTDOWN)

# Sizing: a gil.wait span with 16 holders is ~2.4 KB encoded. 8 MiB holds ~3500
# of them, 5 s at the 64-thread soak's ~700 waits/s; a batch is exported every
# DELAY_S, or as soon as BATCH_SPANS are queued (~1.2 MB, under the 4 MiB a
# collector's gRPC receiver accepts by default).
QUEUE_BYTES = 8 << 20
BATCH_SPANS = 512
DELAY_S = 0.5


@dataclass(frozen=True)
class Resource:
    """One traced process's resource, encoded once and shared by its queued spans."""

    pid: int
    encoded: bytes
    schema_url: str = ""


@dataclass(frozen=True)
class Queued:
    resource: Resource
    name: str  # span name: the counters' key
    payload: bytes  # a serialized Span


Key = Tuple[int, str, str]  # (pid, span name, EXPORTED or a drop reason)


class ExporterLog(logging.Handler):
    """Keeps the last line the OpenTelemetry exporters log instead of printing
    it: a dead endpoint would otherwise log two lines per batch."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: Optional[str] = None
        self.this_export: Optional[str] = None  # the last line since the export began

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.note(record.getMessage())

    def note(self, message: str) -> None:
        self.last = self.this_export = (message.splitlines() or [""])[0][:300]

    def install(self) -> None:
        exporters = logging.getLogger("opentelemetry.exporter")
        exporters.addHandler(self)
        exporters.propagate = False


class Transport:
    """Sends one serialized ExportTraceServiceRequest through an SDK exporter.

    - OTLP/gRPC (OTLPExporterMixin): its `_translate_data` hook turns the batch
      it is given into the request. Its stub is swapped for one whose Export
      sends bytes as they are (a gRPC method with no serializer), so the bytes
      go out unparsed; where the exporter has no `_stub`, the bytes are parsed
      into the request (in C) and serialized again by gRPC.
    - OTLP/HTTP with the http-transport client (SDK 1.4x): `_client.export(bytes)`.
    - anything else: SDK ReadableSpans decoded from the bytes, to `export()`.
    The SDK's own channel, credentials, headers, retries and deadline apply in
    the first two; they are the SDK's private hooks, checked at construction."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        client = getattr(exporter, "_client", None)
        self._http = client if callable(getattr(client, "export", None)) and not hasattr(
            exporter, "_translate_data") else None
        self._grpc = hasattr(exporter, "_translate_data") and hasattr(exporter, "_export")
        self.raw_grpc = False
        if self._grpc:
            self.raw_grpc = hasattr(exporter, "_stub") and hasattr(exporter, "_channel")
            if self.raw_grpc:
                exporter._stub = _RawTraceStub  # type: ignore[attr-defined]
                exporter._client = _RawTraceStub(exporter._channel)  # type: ignore[attr-defined]
                exporter._translate_data = _PreEncoded.payload_of  # type: ignore[attr-defined]
            else:
                exporter._translate_data = _PreEncoded.request  # type: ignore[attr-defined]

    def send(self, payload: bytes, count: int) -> bool:
        if self._grpc:
            result = self.exporter._export(_PreEncoded(payload, count))  # type: ignore[attr-defined]
            return bool(result == SpanExportResult.SUCCESS)
        if self._http is not None:
            return bool(self._http.export(payload).success)
        return self.exporter.export(readable_spans(payload)) == SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.exporter.shutdown()


class _PreEncoded:
    """What the gRPC exporter passes to `_translate_data` and counts with len()."""

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload = payload
        self.count = count

    def __len__(self) -> int:
        return self.count

    @staticmethod
    def request(data: _PreEncoded) -> Any:
        return trace_service_pb2.ExportTraceServiceRequest.FromString(data.payload)

    @staticmethod
    def payload_of(data: _PreEncoded) -> bytes:
        return data.payload


class _RawTraceStub:
    """TraceService/Export (collector/trace/v1/trace_service.proto) taking the
    request as serialized bytes: with no request serializer, gRPC sends them as is."""

    METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(
            self.METHOD, request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString)


# How the SDK's exporters say they ran out of time: gRPC's DEADLINE_EXCEEDED
# status, an HTTP client's "Read timed out" / Timeout exceptions.
_TIMED_OUT = re.compile(r"DEADLINE_EXCEEDED|[Tt]imed? ?out")


def _failure(message: Optional[str]) -> str:
    """The drop reason of a failed export, from the exporter's own last error:
    timeout when it gave up waiting for an answer (a black hole), else
    export_failed (refused, unreachable, an error status)."""
    return TIMEOUT if message is not None and _TIMED_OUT.search(message) else EXPORT_FAILED


def readable_spans(payload: bytes) -> List[Any]:
    """SDK ReadableSpans equal to a request's spans, for exporters without a hook."""
    from opentelemetry.sdk.resources import Resource as SdkResource  # noqa: PLC0415
    from opentelemetry.sdk.trace import ReadableSpan  # noqa: PLC0415
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: PLC0415
    from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags  # noqa: PLC0415

    def ctx(trace_id: bytes, span_id: bytes, remote: bool) -> SpanContext:
        return SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"),
                           is_remote=remote, trace_flags=TraceFlags(TraceFlags.SAMPLED))

    request = trace_service_pb2.ExportTraceServiceRequest.FromString(payload)
    out = []
    for rs in request.resource_spans:
        resource = SdkResource(spanwire_attributes(rs.resource.attributes), rs.schema_url)
        for ss in rs.scope_spans:
            scope = InstrumentationScope(ss.scope.name, ss.scope.version or None)
            for s in ss.spans:
                links = [Link(ctx(lk.trace_id, lk.span_id, True),
                              spanwire_attributes(lk.attributes)) for lk in s.links]
                out.append(ReadableSpan(
                    name=s.name, context=ctx(s.trace_id, s.span_id, False),
                    parent=ctx(s.trace_id, s.parent_span_id, True), resource=resource,
                    attributes=spanwire_attributes(s.attributes), links=links,
                    kind=SpanKind.INTERNAL, start_time=s.start_time_unix_nano,
                    end_time=s.end_time_unix_nano, instrumentation_scope=scope))
    return out


def spanwire_attributes(key_values: Sequence[Any]) -> Dict[str, Any]:
    def value(v: Any) -> Any:
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return tuple(value(x) for x in v.array_value.values)
        return getattr(v, kind) if kind else None
    return {kv.key: value(kv.value) for kv in key_values}


class SpanDelivery:
    """The bounded queue and its export thread."""

    def __init__(self, exporter_factory: Callable[[], SpanExporter],
                 queue_bytes: int = QUEUE_BYTES, batch_spans: int = BATCH_SPANS,
                 delay_s: float = DELAY_S) -> None:
        self.queue_bytes = queue_bytes
        self.batch_spans = batch_spans
        self.delay_s = delay_s
        self.exporter_log = ExporterLog()
        self.exporter_log.install()
        self._transport = Transport(exporter_factory())
        self._queue: Deque[Queued] = deque()
        self._bytes = 0
        self._in_flight: List[Queued] = []  # the batch being exported
        self._abandoned = False  # close() gave up on it and counted it
        self._counts: Dict[Key, int] = {}
        self._cond = threading.Condition()
        self._flushing = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="otel-gil-export", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producer side

    def submit(self, item: Queued) -> bool:
        """Queue a span for export; False (and counted) when the queue is full."""
        size = len(item.payload)
        with self._cond:
            if self._stopping or self._bytes + size > self.queue_bytes:
                self._count(item, SHUTDOWN if self._stopping else QUEUE_FULL)
                return False
            self._queue.append(item)
            self._bytes += size
            if len(self._queue) >= self.batch_spans:
                self._cond.notify_all()
        return True

    def count_drop(self, pid: int, name: str, reason: str) -> None:
        """A span lost before it reached the queue (the sidecar fell behind)."""
        with self._cond:
            key = (pid, name, reason)
            self._counts[key] = self._counts.get(key, 0) + 1

    def counts(self) -> Dict[Key, int]:
        """(pid, span name, outcome) -> spans, since start (a copy)."""
        with self._cond:
            return dict(self._counts)

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def flush(self, timeout_s: float) -> bool:
        """Export everything queued now; True if it all left within timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._queue or self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(remaining)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout_s: float = 3.0) -> None:
        """Flush for at most timeout_s, count what is left as `shutdown`, stop.
        Short by default: a spawned sidecar exits with its app, which waits for it."""
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            while self._queue:
                self._count(self._queue.popleft(), SHUTDOWN)
            self._bytes = 0
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        with self._cond:
            if self._in_flight:  # stuck in the exporter (a black hole): it will not return
                for item in self._in_flight:
                    self._count(item, SHUTDOWN)
                self._abandoned = True
        try:
            self._transport.shutdown()
        except Exception:  # noqa: BLE001 - nothing is left to deliver
            log.debug("otel-gil: exporter shutdown failed", exc_info=True)

    # ------------------------------------------------------------ export thread

    def _count(self, item: Queued, outcome: str, n: int = 1) -> None:
        key = (item.resource.pid, item.name, outcome)
        self._counts[key] = self._counts.get(key, 0) + n

    def _next_batch(self) -> List[Queued]:
        with self._cond:
            if len(self._queue) < self.batch_spans and not self._flushing and not self._stopping:
                self._cond.wait(self.delay_s)
            n = min(len(self._queue), self.batch_spans)
            batch = [self._queue.popleft() for _ in range(n)]
            self._bytes -= sum(len(b.payload) for b in batch)
            self._in_flight = batch
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                self._export(batch)
            with self._cond:
                self._in_flight = []
                self._cond.notify_all()
                if self._stopping and not self._queue:
                    return

    def _export(self, batch: List[Queued]) -> None:
        groups: Dict[int, Tuple[Resource, List[bytes]]] = {}
        for item in batch:
            groups.setdefault(id(item.resource), (item.resource, []))[1].append(item.payload)
        payload = spanwire.encode_request([
            spanwire.ResourceGroup(r.encoded, r.schema_url, SCOPE, spans)
            for r, spans in groups.values()])
        self.exporter_log.this_export = None
        try:
            ok = self._transport.send(payload, len(batch))
        except Exception as exc:  # noqa: BLE001 - a broken exporter must not stop tracing
            self.exporter_log.note(f"{type(exc).__name__}: {exc}")
            ok = False
        outcome = EXPORTED if ok else _failure(self.exporter_log.this_export)
        with self._cond:
            if not self._abandoned:
                for item in batch:
                    self._count(item, outcome)


def _scope() -> bytes:
    from otel_gil import names  # noqa: PLC0415 - names imports nothing of ours

    return spanwire.encode_scope(names.INSTRUMENTATION_SCOPE)


SCOPE = _scope()
