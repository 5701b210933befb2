"""The sidecar's metric readers: OTLP (honouring OTEL_EXPORTER_OTLP_*) and an
optional Prometheus endpoint."""

from __future__ import annotations

import logging
from typing import List

from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

from otel_gil.export import otlp

log = logging.getLogger("otel_gil.metrics")


def default_readers(prometheus_port: int, export_interval_ms: int = 5000) -> List[MetricReader]:
    """OTLP (honouring OTEL_EXPORTER_OTLP_*), and a Prometheus endpoint on the port
    (0: none). A port already in use is one warning, not a failure."""
    readers: List[MetricReader] = [PeriodicExportingMetricReader(
        otlp.exporter("metrics"), export_interval_millis=export_interval_ms)]
    if prometheus_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415
        from prometheus_client import start_http_server  # noqa: PLC0415

        try:
            start_http_server(prometheus_port)
            readers.append(PrometheusMetricReader())
        except OSError as exc:
            log.warning("otel-gil: no Prometheus endpoint on port %s: %s",
                        prometheus_port, exc.strerror)
    return readers
