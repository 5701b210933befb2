"""The loopback OTLP/gRPC receiver (otel_gil.dev.receiver), re-exported for tests, and
the ``otlp_receiver`` pytest fixture that yields a started one."""

from __future__ import annotations

from typing import Iterator

import pytest

from otel_gil.dev.receiver import (  # noqa: F401 - re-exported for the tests
    Link,
    MetricRecord,
    OtlpReceiver,
    SpanRecord,
    any_value,
    attributes,
    metrics_of,
    spans_of,
)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A started OtlpReceiver, stopped after the test."""
    with OtlpReceiver() as receiver:
        yield receiver
