"""`opentelemetry-instrument python app.py` finds this through the
`opentelemetry_instrumentor` entry point (pyproject.toml)."""

from __future__ import annotations

from typing import Any, Collection

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

import otel_gil
from otel_gil import config


class GilInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """GIL wait/hold spans and metrics for this process, through an eBPF sidecar."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        options = {k: v for k, v in kwargs.items() if k in config.ENV}
        otel_gil.instrument(tracer_provider=kwargs.get("tracer_provider"),
                            meter_provider=kwargs.get("meter_provider"), **options)

    def _uninstrument(self, **kwargs: Any) -> None:
        otel_gil.uninstrument()
