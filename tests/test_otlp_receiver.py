"""The loopback OTLP/gRPC receiver gets exactly what the real SDK exporters send."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link
from otlp_receiver import OtlpReceiver, otlp_receiver  # noqa: F401 - the fixture


def test_parent_and_child_spans_arrive_exactly(otlp_receiver: OtlpReceiver) -> None:  # noqa: F811
    # GIVEN an SDK tracer exporting with the real OTLP/gRPC exporter to the receiver
    provider = TracerProvider(resource=Resource({"service.name": "receiver-test"}))
    provider.add_span_processor(SimpleSpanProcessor(
        OTLPSpanExporter(endpoint=otlp_receiver.endpoint, insecure=True)))
    tracer = provider.get_tracer("receiver.scope")
    # WHEN it makes a parent and a child (with an attribute and a link to an outside span)
    linked = tracer.start_span("linked")
    linked.end()
    with tracer.start_as_current_span("parent") as parent, tracer.start_as_current_span(
            "child", attributes={"n": 3, "s": "x", "l": [1, 2]},
            links=[Link(linked.get_span_context(), {"role": "holder"})]) as child:
        pass
    spans = otlp_receiver.wait_for_spans(lambda got: len(got) >= 3, timeout=10)
    provider.shutdown()
    # THEN exactly those three arrive, with the SDK's ids, parents, times and attributes
    assert sorted(span.name for span in spans) == ["child", "linked", "parent"]
    by_name = {span.name: span for span in spans}
    p, c, ln = parent.get_span_context(), child.get_span_context(), linked.get_span_context()
    assert by_name["parent"].trace_id == f"{p.trace_id:032x}"
    assert by_name["parent"].span_id == f"{p.span_id:016x}"
    assert by_name["parent"].parent_span_id == ""
    assert by_name["child"].trace_id == f"{p.trace_id:032x}"
    assert by_name["child"].span_id == f"{c.span_id:016x}"
    assert by_name["child"].parent_span_id == f"{p.span_id:016x}"
    assert by_name["child"].attributes == {"n": 3, "s": "x", "l": [1, 2]}
    assert by_name["child"].links == [
        (f"{ln.trace_id:032x}", f"{ln.span_id:016x}", {"role": "holder"})]
    assert by_name["child"].start_ns == child.start_time
    assert by_name["child"].end_ns == child.end_time
    assert by_name["parent"].start_ns <= by_name["child"].start_ns
    assert by_name["child"].end_ns <= by_name["parent"].end_ns
    assert by_name["child"].resource["service.name"] == "receiver-test"
    assert by_name["child"].scope == "receiver.scope"
    assert len(otlp_receiver.trace_requests) == 3  # SimpleSpanProcessor: one request each


def test_metrics_arrive_exactly(otlp_receiver: OtlpReceiver) -> None:  # noqa: F811
    # GIVEN an SDK meter exporting with the real OTLP/gRPC metric exporter
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=otlp_receiver.endpoint, insecure=True),
        export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader],
                             resource=Resource({"service.name": "receiver-test"}))
    meter = provider.get_meter("receiver.meter")
    # WHEN a counter and a histogram record values and the provider flushes
    meter.create_counter("test.waits", unit="{wait}").add(3, {"thread": "a"})
    histogram = meter.create_histogram("test.wait.duration", unit="s")
    histogram.record(0.5)
    histogram.record(2.0)
    provider.force_flush()
    points = otlp_receiver.wait_for_metrics(lambda got: len(got) >= 2, timeout=10)
    provider.shutdown()
    # THEN the receiver holds both, exactly
    by_name = {point.name: point for point in points}
    assert set(by_name) == {"test.waits", "test.wait.duration"}
    waits = by_name["test.waits"]
    assert (waits.kind, waits.unit, waits.value, waits.attributes, waits.monotonic) == (
        "sum", "{wait}", 3, {"thread": "a"}, True)
    duration = by_name["test.wait.duration"]
    assert duration.kind == "histogram" and duration.unit == "s"
    assert (duration.value["count"], duration.value["sum"]) == (2, 2.5)
    assert (duration.value["min"], duration.value["max"]) == (0.5, 2.0)
    assert duration.resource["service.name"] == "receiver-test"
    assert duration.scope == "receiver.meter"


def test_wait_for_spans_times_out_with_what_it_saw() -> None:
    # GIVEN a receiver nobody sends to
    with OtlpReceiver() as receiver:
        # WHEN waiting for a span that never comes THEN it says so after the timeout
        try:
            receiver.wait_for_spans(lambda got: len(got) > 0, timeout=0.2)
        except TimeoutError as err:
            assert "0 spans" in str(err)
        else:
            raise AssertionError("wait_for_spans returned without spans")
