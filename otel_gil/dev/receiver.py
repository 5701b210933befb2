"""A real OTLP/gRPC receiver on loopback: what `otel-gil demo` collects the app's
and the sidecar's spans and metrics with, and what the tests check them with.

``OtlpReceiver`` serves opentelemetry-proto's TraceService/Export and
MetricsService/Export on 127.0.0.1 (a free port), keeps every request it
receives, and flattens them into simple records that can be compared exactly.
grpcio and opentelemetry-proto come with opentelemetry-exporter-otlp.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from otel_gil.errors import EnvironmentProblem

Link = Tuple[str, str, Dict[str, Any]]


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    start_ns: int
    end_ns: int
    attributes: Dict[str, Any]
    links: List[Link]  # (trace_id hex, span_id hex, attributes)
    resource: Dict[str, Any]
    scope: str
    kind: int = 0
    status_code: int = 0
    flags: int = 0


@dataclass(frozen=True)
class MetricRecord:
    """One data point. ``value`` is the number for sums and gauges; for
    histograms a dict with count, sum, bucket_counts, explicit_bounds, min, max."""

    name: str
    unit: str
    kind: str  # "sum", "gauge", "histogram", "exponential_histogram", "summary"
    attributes: Dict[str, Any]
    value: Any
    time_ns: int
    resource: Dict[str, Any]
    scope: str
    monotonic: Optional[bool] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def any_value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(key_values: Sequence[common_pb2.KeyValue]) -> Dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in key_values}


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> List[SpanRecord]:
    out = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(SpanRecord(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), name=span.name,
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes=attributes(span.attributes),
                    links=[(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes))
                           for link in span.links],
                    resource=resource, scope=scope_spans.scope.name, kind=span.kind,
                    status_code=span.status.code, flags=span.flags))
    return out


def _points(metric: Any) -> Iterator[Tuple[str, Any, Optional[bool]]]:
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    monotonic = data.is_monotonic if kind == "sum" else None
    for point in data.data_points:
        yield kind, point, monotonic


def _value(kind: str, point: Any) -> Any:
    if kind in ("sum", "gauge"):
        return getattr(point, point.WhichOneof("value"))
    if kind == "histogram":
        return {"count": point.count, "sum": point.sum,
                "bucket_counts": list(point.bucket_counts),
                "explicit_bounds": list(point.explicit_bounds),
                "min": point.min, "max": point.max}
    return {"count": point.count, "sum": point.sum}


def metrics_of(request: metrics_service_pb2.ExportMetricsServiceRequest) -> List[MetricRecord]:
    out = []
    for resource_metrics in request.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for kind, point, monotonic in _points(metric):
                    out.append(MetricRecord(
                        name=metric.name, unit=metric.unit, kind=kind,
                        attributes=attributes(point.attributes), value=_value(kind, point),
                        time_ns=point.time_unix_nano, resource=resource,
                        scope=scope_metrics.scope.name, monotonic=monotonic))
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver._store(self.receiver.trace_requests, request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self.receiver._store(self.receiver.metric_requests, request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC server on 127.0.0.1; use as a context manager."""

    def __init__(self, port: int = 0) -> None:
        """port 0: a free one."""
        self.trace_requests: List[Any] = []
        self.metric_requests: List[Any] = []
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        # The generated *_pb2_grpc modules carry no type annotations.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MetricsService(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        if not self.port:
            raise EnvironmentProblem("could not bind an OTLP receiver on 127.0.0.1",
                                     "check that the loopback interface is up")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _store(self, requests: List[Any], request: Any) -> None:
        with self._changed:
            requests.append(request)
            self._changed.notify_all()

    def spans(self) -> List[SpanRecord]:
        with self._changed:
            requests = list(self.trace_requests)
        return [span for request in requests for span in spans_of(request)]

    def metrics(self) -> List[MetricRecord]:
        with self._changed:
            requests = list(self.metric_requests)
        return [point for request in requests for point in metrics_of(request)]

    def wait_for_spans(self, predicate: Callable[[List[SpanRecord]], bool],
                       timeout: float = 10.0) -> List[SpanRecord]:
        """All spans received, once ``predicate(spans)`` holds; TimeoutError otherwise."""
        return self._wait(self.spans, predicate, timeout, "spans")

    def wait_for_metrics(self, predicate: Callable[[List[MetricRecord]], bool],
                         timeout: float = 10.0) -> List[MetricRecord]:
        return self._wait(self.metrics, predicate, timeout, "metric points")

    def _wait(self, get: Callable[[], List[Any]], predicate: Callable[[List[Any]], bool],
              timeout: float, what: str) -> List[Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                items = get()
                if predicate(items):
                    return items
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({getattr(item, "name", "?") for item in items})
                    raise TimeoutError(f"{len(items)} {what} after {timeout} s, "
                                       f"condition not met; names seen: {names}")
                self._changed.wait(remaining)
