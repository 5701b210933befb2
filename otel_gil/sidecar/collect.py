"""Adding the kernel's duration histograms to each metric collection.

The OpenTelemetry SDK (1.20 to 1.45) has no MetricProducer for pre-aggregated
data: GilMetrics wraps each reader's collection and adds the histograms built
here from sidecar/histograms.py's series, cumulative or as deltas, as that
reader's temporality asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from opentelemetry.sdk.metrics import Exemplar as SdkExemplar
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_gil import names
from otel_gil.sidecar import histograms

Labels = Tuple[Tuple[str, Any], ...]


@dataclass
class ReaderState:
    """What one metric reader was last given (exemplar window, delta snapshots)."""

    last_ns: int = 0
    snapshots: Dict[Tuple[str, Labels], histograms.Snapshot] = field(default_factory=dict)


def histogram_temporality(reader: MetricReader) -> AggregationTemporality:
    prefs = getattr(reader, "_instrument_class_temporality", {})
    for cls, temporality in prefs.items():
        if isinstance(cls, type) and issubclass(cls, SdkHistogram):
            return AggregationTemporality(temporality)
    return AggregationTemporality.CUMULATIVE


def with_metrics(data: Optional[MetricsData], metrics: List[Metric],
                 resource: Resource) -> MetricsData:
    """data with metrics added to otel_gil's scope (created if absent)."""
    rms = list(data.resource_metrics) if data is not None else []
    if not rms:
        rms = [ResourceMetrics(resource=resource, scope_metrics=[], schema_url="")]
    first = rms[0]
    scopes = list(first.scope_metrics)
    at = next((i for i, s in enumerate(scopes) if s.scope.name == names.INSTRUMENTATION_SCOPE),
              None)
    if at is None:
        scopes.append(ScopeMetrics(scope=InstrumentationScope(names.INSTRUMENTATION_SCOPE),
                                   metrics=metrics, schema_url=""))
    else:
        scopes[at] = ScopeMetrics(scope=scopes[at].scope,
                                  metrics=list(scopes[at].metrics) + metrics,
                                  schema_url=scopes[at].schema_url)
    rms[0] = ResourceMetrics(resource=first.resource, scope_metrics=scopes,
                             schema_url=first.schema_url)
    return MetricsData(resource_metrics=rms)


def histogram_metric(metric: names.Metric, hset: histograms.HistogramSet, kind: str,
                     state: ReaderState, temporality: AggregationTemporality, now: int,
                     start_ns: int) -> Optional[Metric]:
    """One duration histogram as an SDK Metric, for one reader: cumulative, or
    the delta since that reader's previous collection; exemplars since then."""
    points = []
    for labels, series in hset.series.items():
        if not series.count and not series.exemplars:
            continue
        exemplars = [SdkExemplar({}, ex.value_ns / 1e9, ex.time_unix_nano, ex.span_id,
                                 ex.trace_id)
                     for ex in series.exemplars.values() if ex.time_unix_nano > state.last_ns]
        start, mx = start_ns, (series.max_ns / 1e9 if series.max_ns else None)
        counts, total = list(series.counts), series.sum_ns
        if temporality == AggregationTemporality.DELTA:
            last = state.snapshots.get((kind, labels))
            counts, total = histograms.delta(series, last)
            start, mx = (last.time_unix_nano if last else start_ns), None
            state.snapshots[(kind, labels)] = histograms.Snapshot(
                tuple(series.counts), series.sum_ns, now)
        # min is unknown (the kernel keeps buckets, not the smallest value):
        # None leaves it unset in OTLP; Prometheus has no min.
        points.append(HistogramDataPoint(
            attributes=dict(labels), start_time_unix_nano=start, time_unix_nano=now,
            count=sum(counts), sum=total / 1e9, bucket_counts=counts,
            explicit_bounds=histograms.BOUNDARIES_S, min=None,  # type: ignore[arg-type]
            max=mx, exemplars=exemplars))  # type: ignore[arg-type]
    if not points:
        return None
    return Metric(name=metric.name, description=metric.doc, unit=metric.unit,
                  data=HistogramData(data_points=points, aggregation_temporality=temporality))
