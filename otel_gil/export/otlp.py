"""The OTLP exporter for a signal, chosen the way the OpenTelemetry SDK's own
configurator does: OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL, else
OTEL_EXPORTER_OTLP_PROTOCOL, else grpc; any "http..." value means http/protobuf.
The exporters read their endpoint, headers and TLS settings from the same
OTEL_EXPORTER_OTLP_* variables themselves.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Tuple

__all__ = ["exporter"]

# (signal, transport) -> (module, class) in opentelemetry-exporter-otlp-proto-{grpc,http};
# imported on use, so that a process needs only the transport it exports with.
_EXPORTERS: Dict[Tuple[str, str], Tuple[str, str]] = {
    ("traces", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                         "OTLPSpanExporter"),
    ("traces", "http"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                         "OTLPSpanExporter"),
    ("metrics", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
                          "OTLPMetricExporter"),
    ("metrics", "http"): ("opentelemetry.exporter.otlp.proto.http.metric_exporter",
                          "OTLPMetricExporter"),
}


def exporter(signal: str) -> Any:
    """A new OTLP exporter for ``signal`` ("traces" or "metrics")."""
    if signal not in ("traces", "metrics"):
        raise ValueError(f"no OTLP exporter for signal {signal!r}")
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    transport = "http" if protocol.startswith("http") else "grpc"
    module, name = _EXPORTERS[(signal, transport)]
    return getattr(importlib.import_module(module), name)()
