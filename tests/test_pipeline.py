"""The sidecar's span pipeline downstream of the kernel: nothing lost silently.

Pure parts first (the OTLP bytes against the SDK's own encoder, the bounded
queue and its drop counts with real SDK exporters, the loss log, the histogram
fold, the app's counters in its context table). Then the faults, with real
probes, a real long-running sidecar and a real app (8 threads of short spans
with Python work and zlib): the OTLP endpoint unreachable, black-holed, and
coming back. For those the sidecar's wait threshold is the kernel's 2^20 ns
histogram edge, so every wait that became an event is also counted, exactly,
in the wait histogram's buckets above that edge; the test checks that each of
them was exported, dropped (by reason) or skipped (by reason), and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from bisect import bisect_right
from collections import deque
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from otlp_receiver import OtlpReceiver, otlp_receiver  # noqa: F401 - fixture

from otel_gil import names
from otel_gil.abi import buckets, events
from otel_gil.app import context
from otel_gil.export import delivery, spanwire
from otel_gil.sidecar import histograms, host, threads, timeline
from otel_gil.sidecar import spans as export
from otel_gil.sidecar.losses import LossLog

ROOT = Path(__file__).parent.parent
SERVICE = "pipeline-test"
EDGE_NS = 1 << 20  # the exported "1 ms" bucket edge, and the sidecar's wait threshold here

# ------------------------------------------------------------ the OTLP bytes


def _sdk_request(spans: Sequence[spanwire.SpanData], resource: Resource) -> Any:
    """What the SDK's own OTLP encoder makes of the same spans."""
    links = [Link(SpanContext(t, s, True, TraceFlags(1)), attrs) for t, s, attrs in _LINKS]
    readable = []
    for s in spans:
        readable.append(ReadableSpan(
            name=s.name, context=SpanContext(s.trace_id, s.span_id, False, TraceFlags(1)),
            parent=SpanContext(s.trace_id, s.parent_span_id, True, TraceFlags(1)),
            resource=resource, attributes={**_COMMON, **s.attributes}, links=links,
            kind=SpanKind.INTERNAL, start_time=s.start_ns, end_time=s.end_ns,
            instrumentation_scope=InstrumentationScope(names.INSTRUMENTATION_SCOPE)))
    return encode_spans(readable)


_COMMON = {names.THREAD_NAME.name: "wörker-1 ✓", names.THREAD_NATIVE_ID.name: 4242,
           names.CLOCK_UNCERTAINTY_NS.name: 0}
_LINKS = [(0xAA << 100, 0xBB, {names.LINK_ROLE.name: "holder", names.LINK_HELD_NS.name: 5}),
          (0x1, 0xFFFFFFFFFFFFFFFF,
           {names.LINK_ROLE.name: "holder", names.LINK_HELD_NS.name: 1 << 40})]


def test_span_bytes_are_what_the_sdk_encoder_makes() -> None:
    # GIVEN spans with every attribute type we emit, and links
    attrs: Dict[str, Any] = {"i": -3, "big": 1 << 62, "b": True, "f": False, "x": 2.5,
                             "s": "", "ints": [0, 127, 128, 1 << 35], "strs": ["a", "ü"],
                             "none": [], names.HOLDERS_TRUNCATED.name: False}
    encoder = spanwire.LinkEncoder({names.LINK_ROLE.name: "holder"}, names.LINK_HELD_NS.name)
    links = [encoder.encode(t, s, a[names.LINK_HELD_NS.name]) for t, s, a in _LINKS]
    spans = [spanwire.SpanData(names.GIL_WAIT.name, 0x1234 << 64, 0x5678, 0x9ABC, 10**18,
                               10**18 + 1, attrs, links, spanwire.encode_attributes(_COMMON)),
             spanwire.SpanData(names.GIL_HOLD.name, 7, 8, 9, 1, 2, {"n": 1}, links,
                               spanwire.encode_attributes(_COMMON))]
    resource = Resource.create({"service.name": "svc", "k": [1, 2]})
    # WHEN they are framed into a request as the export thread does
    ours = spanwire.encode_request([spanwire.ResourceGroup(
        spanwire.encode_resource(resource.attributes), resource.schema_url, delivery.SCOPE,
        [s.encode() for s in spans])])
    # THEN it parses to exactly the SDK's encoding of the same spans
    assert ExportTraceServiceRequest.FromString(ours) == _sdk_request(spans, resource)
    # AND an exporter without a fast path gets SDK spans that encode the same
    assert encode_spans(delivery.readable_spans(ours)) == _sdk_request(spans, resource)


def test_holders_of_agrees_with_timeline_blame() -> None:
    # GIVEN a wait whose holds overlap it in every way (inside, across each end,
    # outside, the waiter's own, a holder twice, unsampled and missing spans)
    sampled, unsampled = events.SpanRef(1, 2, 1), events.SpanRef(3, 4, 0)
    holds = (events.Hold(7, 150, 210, sampled), events.Hold(8, 120, 150, unsampled),
             events.Hold(7, 50, 120, sampled), events.Hold(5, 100, 130, sampled),
             events.Hold(9, 10, 90, sampled), events.Hold(10, 160, 170, None))
    wait = events.Interval("wait", 1, 5, 100, 200, None, holds=holds, holds_total=9)
    # WHEN the holders are worked out in one pass
    blame, links = timeline.holders_of(wait)
    # THEN they are timeline.blame()'s, and the links the sampled spans they held in
    assert blame == [(b.tid, b.held_ns) for b in timeline.blame(wait)] == \
        [(7, 50 + 20), (8, 30), (10, 10)]
    assert links == [(1, 2, 70)]


# -------------------------------------------------------- the queue, by reason


class _Exporter(SpanExporter):
    """A real SDK exporter interface with a scripted result per batch."""

    def __init__(self, results: List[Any], gate: Optional[threading.Event] = None) -> None:
        self.results = results
        self.gate = gate
        self.batches: List[int] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(len(spans))
        result = self.results.pop(0) if self.results else SpanExportResult.SUCCESS
        if isinstance(result, Exception):
            raise result
        if isinstance(result, str):  # log like the OTLP exporters do, then fail
            logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").error(result)
            return SpanExportResult.FAILURE
        return result  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        pass


def _item(n: int = 0) -> delivery.Queued:
    span = spanwire.SpanData(names.GIL_WAIT.name, 1, n + 1, 2, 0, 1, {"n": n})
    return delivery.Queued(_RESOURCE, names.GIL_WAIT.name, span.encode())


_RESOURCE = delivery.Resource(77, spanwire.encode_resource({"service.name": "q"}))


def _wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_every_span_is_exported_or_dropped_by_reason() -> None:
    # GIVEN a queue whose exporter fails a batch, times out on one, raises on one
    exporter = _Exporter([SpanExportResult.FAILURE,
                          "Failed to export traces to x, error code: StatusCode.DEADLINE_EXCEEDED",
                          RuntimeError("boom"), SpanExportResult.SUCCESS])
    q = delivery.SpanDelivery(lambda: exporter, batch_spans=10, delay_s=0.01)
    try:
        # WHEN four batches of ten go through it, one at a time
        for b in range(4):
            for i in range(10):
                assert q.submit(_item(b * 10 + i))
            assert q.flush(10)
    finally:
        q.close()
    # THEN each batch is counted once, under its outcome
    key = (77, names.GIL_WAIT.name)
    assert q.counts() == {(*key, delivery.EXPORT_FAILED): 20, (*key, delivery.TIMEOUT): 10,
                          (*key, delivery.EXPORTED): 10}
    assert exporter.batches == [10, 10, 10, 10]
    assert q.exporter_log.last == "RuntimeError: boom"


def test_a_full_queue_drops_and_counts_the_overflow() -> None:
    # GIVEN a queue of 20 spans' worth of bytes, its exporter stuck on the first batch
    gate = threading.Event()
    exporter = _Exporter([], gate)
    size = len(_item().payload)
    q = delivery.SpanDelivery(lambda: exporter, queue_bytes=20 * size, batch_spans=5,
                              delay_s=0.01)
    try:
        for i in range(5):
            q.submit(_item(i))
        _wait_for(lambda: q.queued == 5 and not q._queue)  # that batch is in the exporter
        # WHEN 100 more arrive
        accepted = sum(q.submit(_item(i)) for i in range(100))
        # THEN 20 fit and 80 are dropped as queue_full; once unstuck, all 25 go out
        assert accepted == 20
        gate.set()
        assert q.flush(10)
    finally:
        gate.set()
        q.close()
    key = (77, names.GIL_WAIT.name)
    assert q.counts() == {(*key, delivery.QUEUE_FULL): 80, (*key, delivery.EXPORTED): 25}


def test_close_counts_what_could_not_leave() -> None:
    # GIVEN an exporter that never answers (a black hole) and 12 queued spans
    gate = threading.Event()
    q = delivery.SpanDelivery(lambda: _Exporter([], gate), batch_spans=4, delay_s=0.01)
    for i in range(12):
        q.submit(_item(i))
    _wait_for(lambda: len(q._queue) == 8)
    # WHEN the sidecar exits with a short flush budget
    started = time.monotonic()
    q.close(timeout_s=0.5)
    # THEN it does not wait for the exporter, and all 12 are counted as shutdown
    assert time.monotonic() - started < 5
    assert q.counts() == {(77, names.GIL_WAIT.name, delivery.SHUTDOWN): 12}
    assert not q.submit(_item())
    assert q.counts()[(77, names.GIL_WAIT.name, delivery.SHUTDOWN)] == 13
    gate.set()


def test_the_real_otlp_exporter_takes_the_fast_path(
        otlp_receiver: OtlpReceiver) -> None:  # noqa: F811
    # GIVEN the SDK's OTLP exporters, configured the usual way, and a real receiver
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    q = delivery.SpanDelivery(
        lambda: OTLPSpanExporter(endpoint=otlp_receiver.endpoint, insecure=True), delay_s=0.01)
    assert q._transport._grpc and q._transport.raw_grpc  # the bytes go out unparsed
    try:
        # WHEN spans go through the queue
        for i in range(30):
            q.submit(_item(i))
        assert q.flush(10)
    finally:
        q.close()
    # THEN the receiver has them all, under the process's resource and our scope
    spans = otlp_receiver.wait_for_spans(lambda got: len(got) >= 30)
    assert sorted(int(s.span_id, 16) for s in spans) == list(range(1, 31))
    assert {s.resource["service.name"] for s in spans} == {"q"}
    assert {s.scope for s in spans} == {names.INSTRUMENTATION_SCOPE}
    assert q.counts() == {(77, names.GIL_WAIT.name, delivery.EXPORTED): 30}


# ------------------------------------------------------------- the loss log


def test_losses_are_logged_at_most_once_a_minute_and_at_exit(caplog: Any) -> None:
    totals: Dict[str, int] = {"spans dropped (queue_full)": 0, "kernel events lost": 0}
    log = LossLog(lambda: dict(totals), lambda new: "last exporter error: x", now_ns=0,
                  period_ns=60)
    caplog.set_level(logging.WARNING, "otel_gil.sidecar")
    # GIVEN losses right after start WHEN the loop asks before a minute passed
    totals["spans dropped (queue_full)"] = 5
    assert not log.maybe_log(30)
    # THEN one line once the minute is up, with the losses since the last line
    assert log.maybe_log(61)
    totals["spans dropped (queue_full)"] = 7
    assert not log.maybe_log(100)
    totals["kernel events lost"] = 1
    assert log.final(110)
    assert not log.final(111)  # nothing new
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "otel-gil: lost in the last 0 s: 5 spans dropped (queue_full) (last exporter error: x); "
        "since start: 5 spans dropped (queue_full)",
        "otel-gil: lost in the last 0 s: 1 kernel events lost, 2 spans dropped (queue_full) "
        "(last exporter error: x); since start: 1 kernel events lost, 7 spans dropped "
        "(queue_full)"]


# ------------------------------------------------------------ the loop's pace


class _SlowExport:
    """SpanExport.on_interval that burns a thread-CPU budget's worth per span."""

    def __init__(self, cpu_ns: int) -> None:
        self.cpu_ns = cpu_ns
        self.exported: List[Any] = []

    def on_interval(self, iv: Any) -> None:
        until = time.thread_time_ns() + self.cpu_ns
        while time.thread_time_ns() < until:
            pass
        self.exported.append(iv)


def _loop_with(pending: Sequence[Tuple[int, Any]], cpu_ns: int) -> Any:
    """The parts of a Sidecar that _export_settled uses."""
    from types import SimpleNamespace

    return SimpleNamespace(_pending=deque(pending), export=_SlowExport(cpu_ns),
                           metrics=SimpleNamespace(record_interval=lambda iv, span: None))


def test_the_export_budget_says_when_settled_spans_are_left() -> None:
    from otel_gil.sidecar.server import EXPORT_DELAY_NS, Sidecar

    now = time.monotonic_ns()
    settled, fresh = now - 2 * EXPORT_DELAY_NS, now + EXPORT_DELAY_NS
    # GIVEN 20 settled intervals, each costing a quarter of a turn's export budget
    loop = _loop_with([(settled, i) for i in range(20)], host.EXPORT_BUDGET_NS // 4)
    # WHEN a turn exports THEN it stops on the budget (the clock is read every
    # 8th interval), behind, with settled ones left
    assert Sidecar._export_settled(loop) is True
    assert loop.export.exported == list(range(8)) and len(loop._pending) == 12
    # AND with only intervals still in their export delay left, it is not behind
    loop = _loop_with([(settled, "a"), (fresh, "b")], 0)
    assert Sidecar._export_settled(loop) is False
    assert loop.export.exported == ["a"] and len(loop._pending) == 1
    # AND everything=True exports all of them, settled or not, whatever the budget
    loop = _loop_with([(settled, "a"), (fresh, "b")], host.EXPORT_BUDGET_NS)
    assert Sidecar._export_settled(loop, everything=True) is False
    assert loop.export.exported == ["a", "b"]


def test_a_turn_left_behind_is_followed_at_once_a_few_times_in_a_row() -> None:
    pace = host.Pace()
    # GIVEN turns that each ran out of export budget with spans due
    # THEN the next CATCH_UP_TURNS turns neither sleep nor wait for events
    # (a POLL_MS wait per budget capped delivery at ~1100 spans/s)
    for _ in range(host.CATCH_UP_TURNS):
        assert pace.after(True, 0.001) == (0, 0.0)
    # AND then one turn waits POLL_MS all the same: a sidecar that cannot keep up
    # takes about half a core, not all of it (the excess is dropped, counted)
    assert pace.after(True, 0.001) == (host.POLL_MS, pytest.approx(host.MIN_TURN_S - 0.001))
    assert pace.after(True, 0.001) == (0, 0.0)
    # AND a turn that exported everything due waits for events, and lasts MIN_TURN_S
    poll_ms, rest = pace.after(False, 0.005)
    assert poll_ms == host.POLL_MS > 0 and rest == pytest.approx(host.MIN_TURN_S - 0.005)
    assert pace.after(False, host.MIN_TURN_S + 0.01) == (host.POLL_MS, 0.0)
    assert pace.after(True, 0.5) == (0, 0.0)  # the count starts again


def test_a_settled_heap_keeps_start_up_objects_out_of_the_gc_and_still_collects_cycles() -> None:
    # GIVEN a fresh interpreter that imported what a sidecar imports, then settled its heap
    code = """if True:
        import gc, json, weakref
        import opentelemetry.sdk.trace, otel_gil.sidecar.spans
        from otel_gil.sidecar import host
        host.settle_heap()
        frozen = gc.get_freeze_count()
        class Node: pass
        a, b = Node(), Node()
        a.b, b.a = b, a  # a cycle, made after
        gone = weakref.ref(a)
        del a, b
        young = [[] for _ in range(host.SERVING_GC_THRESHOLDS[0] + 1)]  # the loop's kind
        print(json.dumps({"frozen": frozen, "threshold": gc.get_threshold(),
                          "cycle_collected": gone() is None}))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    state = json.loads(out)
    # THEN the start-up's objects are out of the GC's scans, and it collects less often
    assert state["frozen"] > 10_000, state
    assert tuple(state["threshold"]) == host.SERVING_GC_THRESHOLDS
    # AND a cycle made afterwards is still collected, by a young collection
    assert state["cycle_collected"] is True, state


# ------------------------------------------------------------ the histograms


def test_exported_edges_are_kernel_bucket_edges() -> None:
    # GIVEN every kernel bucket's range WHEN folded onto the exported buckets
    for b in range(events.GIL_HIST_BUCKETS):
        low, high = buckets.bucket_bounds(b)
        # THEN both ends of it land in the exported bucket the fold says
        assert histograms.FOLD[b] == bisect_right(histograms.EDGES_NS, low) == \
            bisect_right(histograms.EDGES_NS, high - 1), b
    lows = {buckets.bucket_bounds(b)[0] for b in range(events.GIL_HIST_BUCKETS)}
    assert set(histograms.EDGES_NS) <= lows
    assert list(histograms.EDGES_NS) == sorted(histograms.EDGES_NS)
    # AND each is within 8% of its 1-2-5 value
    nominal = [n * 10**d for d in range(3, 10) for n in (1, 2, 5)] + [10**10]  # 1 µs .. 10 s
    for edge, ns in zip(histograms.EDGES_NS, nominal, strict=True):
        assert abs(edge - ns) <= 0.08 * ns, edge


def test_folding_kernel_histograms_is_exact_and_survives_tid_reuse() -> None:
    hset = histograms.HistogramSet()
    labels = (("thread.name", "t"),)
    durations = [10, 1023, 1024, 5000, 1 << 20, (1 << 20) - 1, 3_000_000_000, 10**12]
    kernel = [0] * events.GIL_HIST_BUCKETS
    for ns in durations:
        kernel[buckets.bucket_of(ns)] += 1
    # GIVEN a thread's kernel histogram, read twice, the second time unchanged
    hset.fold_thread(1, labels, kernel, sum(durations), max(durations))
    hset.fold_thread(1, labels, kernel, sum(durations), max(durations))
    series = hset.series[labels]
    # THEN each duration is counted once, in the bucket its value belongs to
    expected = [0] * (len(histograms.EDGES_NS) + 1)
    for ns in durations:
        expected[bisect_right(histograms.EDGES_NS, ns)] += 1
    assert series.counts == expected and series.sum_ns == sum(durations)
    # WHEN a new thread reuses the tid (its kernel counts start again from zero)
    fresh = [0] * events.GIL_HIST_BUCKETS
    fresh[buckets.bucket_of(2048)] = 1
    hset.fold_thread(1, labels, fresh, 2048, 2048)
    # THEN its wait is added, nothing is subtracted
    assert series.count == len(durations) + 1
    assert series.sum_ns == sum(durations) + 2048


# -------------------------------------------------- the app's context counters


def test_the_app_keeps_its_counters_in_the_table_header() -> None:
    # GIVEN an app-side table that had unplaced threads and swallowed errors
    table = context.ContextTable(slots=4)
    table.unplaced += 3
    table.errors += 2
    # WHEN the sidecar reads the header from the process's memory
    # THEN it reads what the app counted
    assert threads.read_counters(os.getpid(), table.address) == (3, 2)
    assert (table.unplaced, table.errors) == (3, 2)
    # AND a forked child's table starts from zero
    table.reset()
    assert threads.read_counters(os.getpid(), table.address) == (0, 0)


# ==================================================== faults, with real probes

APP = r"""
import json, os, sys, threading, time, zlib
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import otel_gil

threads, seconds = int(sys.argv[1]), float(sys.argv[2])
mine = InMemorySpanExporter()  # the app's own spans: none may be lost
provider = TracerProvider(resource=Resource.create({"service.name": "pipeline-test"}))
provider.add_span_processor(SimpleSpanProcessor(mine))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("pipeline-test")
payload = bytes(range(256)) * 16
made = [0] * threads
stop = threading.Event()

def work(i):
    while not stop.is_set():
        with tracer.start_as_current_span("work"):
            sum(j * j for j in range(2000))
            zlib.compress(payload, 6)
        made[i] += 1

otel_gil.instrument()
live = otel_gil.wait_until_live(60)
pool = [threading.Thread(target=work, args=(i,), name=f"worker-{i}") for i in range(threads)]
for t in pool:
    t.start()
print(json.dumps({"live": live, "status": otel_gil.status()}), flush=True)
time.sleep(seconds)
stop.set()
for t in pool:
    t.join()
print(json.dumps({"made": sum(made), "kept": len(mine.get_finished_spans())}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BlackHole:
    """A TCP listener on loopback that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class Sidecar:
    """`otel-gil sidecar --listen` as a real process, with its Prometheus endpoint."""

    def __init__(self, tmp: Path, endpoint_port: int, *extra: str) -> None:
        self.sock = str(tmp / "gil.sock")
        self.prom = _free_port()
        self.log = tmp / "sidecar.log"
        self.env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{endpoint_port}",
                        OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_EXPORTER_OTLP_TIMEOUT="2")
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "otel_gil", "sidecar", "--listen", self.sock,
                 "--prometheus-port", str(self.prom),
                 "--wait-threshold-ms", str(EDGE_NS / 1e6), *extra],
                env=self.env, stderr=err, stdout=subprocess.DEVNULL)
        _wait_for(lambda: "listening" in self.log.read_text() or self.proc.poll() is not None,
                  60)
        assert self.proc.poll() is None, self.log.read_text()

    def rss_anon_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon:")) / 1024

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.prom}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _value(text: str, series: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include these."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{series}\{{([^}}]*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _accounting(text: str) -> Dict[str, float]:
    """For the app's gil.wait spans: the events (waits above the 2^20 ns edge,
    from the histogram) and what became of them."""
    hist = names.WAIT_DURATION.prometheus
    span = {"service_name": SERVICE, "span_name": names.GIL_WAIT.name}
    out = {"events": _value(text, f"{hist}_count", service_name=SERVICE)
           - _value(text, f"{hist}_bucket", service_name=SERVICE, le=repr(EDGE_NS / 1e9)),
           "exported": _value(text, names.SPANS_EXPORTED.prometheus, **span),
           "lost": _value(text, names.LOST_EVENTS.prometheus)}
    for reason in delivery.DROP_REASONS:
        out[reason] = _value(text, names.SPANS_DROPPED.prometheus, reason=reason, **span)
    for reason in export.SKIP_REASONS:
        out[reason] = _value(text, names.SPANS_SKIPPED.prometheus, reason=reason, **span)
    return out


def _balanced(acc: Dict[str, float]) -> bool:
    return acc["events"] > 0 and acc["events"] == sum(v for k, v in acc.items()
                                                      if k not in ("events", "lost"))


def _run_app(sidecar: Sidecar, seconds: float, during: Optional[Any] = None,
             threads: int = 8) -> Tuple[Dict[str, Any], subprocess.CompletedProcess]:
    env = dict(os.environ, OTEL_PYTHON_GIL_SOCKET=sidecar.sock, OTEL_PYTHON_GIL_MODE="connect")
    app = subprocess.Popen([sys.executable, "-c", APP, str(threads), str(seconds)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert app.stdout is not None
    started = json.loads(app.stdout.readline())
    assert started["live"] is True, started
    if during is not None:
        during()
    out, err = app.communicate(timeout=120)
    return json.loads(out.splitlines()[-1]), subprocess.CompletedProcess(app.args, app.returncode,
                                                                          out, err)


def _settled(sidecar: Sidecar, timeout: float = 90) -> Dict[str, float]:
    """The accounting once every event of the (exited) app has been decided on."""
    deadline = time.monotonic() + timeout
    while True:
        acc = _accounting(sidecar.scrape())
        if _balanced(acc) or time.monotonic() > deadline:
            return acc
        time.sleep(1)


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Any]:
    made: List[Sidecar] = []

    def make(port: int, *extra: str) -> Sidecar:
        made.append(Sidecar(tmp_path, port, *extra))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def _app_unharmed(result: Dict[str, Any], proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert result["made"] == result["kept"] > 0  # not one of its own spans lost
    assert proc.stderr == ""  # the sidecar is another process: nothing in the app's log


@pytest.mark.ebpf
def test_default_sizing_delivers_every_span_from_64_threads(sidecar_factory: Any) -> None:
    # GIVEN a sidecar with its default queue, exporting to a real receiver
    with OtlpReceiver() as receiver:
        sidecar = sidecar_factory(receiver.port)
        # WHEN an app of 64 threads making short spans is traced for 10 s
        result, proc = _run_app(sidecar, 10, threads=64)
        _app_unharmed(result, proc)
        acc = _settled(sidecar)
        received = [s for s in receiver.spans() if s.name == names.GIL_WAIT.name]
    # THEN every wait that became an event was exported (or skipped by design)
    assert _balanced(acc), acc
    dropped = {r: acc[r] for r in delivery.DROP_REASONS}
    assert acc["lost"] == 0 and not any(dropped.values()), acc
    # AND the receiver has each of them, at a real load (the app's rate follows
    # the host's: 282/s in one CI run, ~2000/s on an idle machine)
    assert len(received) == acc["exported"] >= 10 * 150, (len(received), acc)


@pytest.mark.ebpf
def test_unreachable_endpoint(sidecar_factory: Any) -> None:
    # GIVEN a sidecar whose OTLP endpoint is a closed port
    sidecar = sidecar_factory(_free_port())
    # WHEN an app with 8 contending threads is traced for 5 s and exits
    result, proc = _run_app(sidecar, 5)
    # THEN the app is unharmed
    _app_unharmed(result, proc)
    # AND every wait that became an event was dropped as export_failed or skipped
    acc = _settled(sidecar)
    assert _balanced(acc), acc
    assert acc["lost"] == 0 and acc["exported"] == 0
    assert acc["export_failed"] > 0 and acc["timeout"] == 0
    # AND the sidecar says so in one line, with the exporter's error, and no more
    sidecar.stop()
    lines = [ln for ln in sidecar.log.read_text().splitlines() if "lost in the last" in ln]
    assert len(lines) == 1, sidecar.log.read_text()
    assert f"{int(acc['export_failed'])} spans dropped (export_failed)" in lines[0]
    assert "last exporter error: " in lines[0] and "UNAVAILABLE" in lines[0]
    assert "Transient error" not in sidecar.log.read_text().replace(lines[0], "")


@pytest.mark.ebpf
def test_black_holed_endpoint_stays_within_the_memory_bound(sidecar_factory: Any) -> None:
    # GIVEN a sidecar exporting to a listener that never answers, with a small queue
    hole = BlackHole()
    try:
        # (no holder stacks: their symbol tables load once per object on first
        # use, ~5 MB for a libpython with debug symbols, a one-time step this
        # check of the span queue's bound would mistake for growth)
        sidecar = sidecar_factory(hole.port, "--span-queue-mb", "0.25",
                                  "--stack-threshold-ms", "0")
        rss: List[float] = []
        # WHEN an app is traced for 8 s (its spans pile up behind 2 s timeouts)
        result, proc = _run_app(sidecar, 8, during=lambda: rss.extend(
            _sample(sidecar.rss_anon_mb, 7)))
        _app_unharmed(result, proc)
        acc = _settled(sidecar)
    finally:
        hole.close()
    # THEN every event was dropped, by timeout or because the queue was full, or skipped
    assert _balanced(acc), acc
    assert acc["lost"] == 0 and acc["exported"] == 0
    assert acc["timeout"] > 0 and acc["queue_full"] > 0
    # AND the sidecar's memory stayed flat while the endpoint swallowed everything
    # (from 1 s in: the first second attaches and encodes the first spans). The
    # backlog of decoded events is bounded with the queue (server.MIN_PENDING
    # here, ~2 MB): a sidecar short of CPU drops them rather than grow (it grew
    # by 1-2 MB/s to 30 MB above this before)
    assert max(rss[2:]) - rss[2] < 10, rss


def _sample(fn: Any, seconds: float) -> List[float]:
    out = []
    for _ in range(int(seconds * 2)):
        out.append(fn())
        time.sleep(0.5)
    return out


@pytest.mark.ebpf
def test_recovery_when_the_endpoint_comes_back(sidecar_factory: Any) -> None:
    # GIVEN a sidecar whose endpoint is down
    port = _free_port()
    sidecar = sidecar_factory(port)
    receivers: List[OtlpReceiver] = []

    def endpoint_returns() -> None:
        time.sleep(4)
        receivers.append(OtlpReceiver(port=port).start())

    try:
        # WHEN the endpoint comes up 4 s into a 12 s run
        result, proc = _run_app(sidecar, 12, during=endpoint_returns)
        _app_unharmed(result, proc)
        acc = _settled(sidecar)
        received = [s for s in receivers[0].spans() if s.name == names.GIL_WAIT.name]
    finally:
        for r in receivers:
            r.stop()
    # THEN spans were dropped while it was down, and delivered once it was back
    assert _balanced(acc), acc
    assert acc["lost"] == 0
    assert acc["export_failed"] > 0 and acc["exported"] > 0
    # AND what the sidecar counts as exported is exactly what arrived
    assert len(received) == acc["exported"]
    assert {s.resource["service.name"] for s in received} == {SERVICE}


# ------------------------------------------------ what grows in record mode


@pytest.mark.ebpf
def test_record_keeps_at_most_max_intervals_and_counts_the_rest() -> None:
    from targets import all_targets, require, spawn
    from test_record import WORKLOAD

    from otel_gil.cli import report
    from otel_gil.probes.config import ProbeConfig
    from otel_gil.probes.session import Session

    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    child = spawn(target, WORKLOAD)
    try:
        child.read_json(timeout=60)
        # GIVEN a session that may keep 5 intervals, on 4 CPU-bound threads
        session = Session(ProbeConfig(), max_intervals=5)
        session.add(child.host_pid)
        child.send("go")
        result: Dict[str, Any] = {}
        while not result:
            session.step(50)
            try:
                result = child.read_json(timeout=0.05)
            except TimeoutError:
                continue
        child.send("exit")
        child.popen.wait(timeout=30)
        while session.active:
            session.step(50)
        session.close()
    finally:
        child.close()
    # THEN it kept 5, counted the others, and the record says so
    assert len(session.intervals) == 5
    assert session.intervals_dropped > 0
    doc = report.to_json(session)
    assert doc["intervals_dropped"] == session.intervals_dropped
    assert f"(and {session.intervals_dropped} more not kept" in report.table(doc)
    # AND the per-thread totals still count every wait
    waits = sum(sum(t.wait_hist or []) for t in session.threads.values())
    assert waits > 5 + session.intervals_dropped


def test_totals_read_whatever_fields_the_probe_set_keeps() -> None:
    import ctypes

    from otel_gil.probes.totals import ThreadTotals

    class Contended(ctypes.Structure):  # a probe set keeping waits only
        _fields_ = [("pid", ctypes.c_uint32), ("exited", ctypes.c_uint32),
                    ("wait_ns", ctypes.c_uint64),
                    ("wait_hist", ctypes.c_uint32 * events.GIL_HIST_BUCKETS)]

    raw = Contended(pid=1, exited=0, wait_ns=7)
    raw.wait_hist[3] = 2
    # GIVEN a kernel struct without hold totals WHEN the totals are copied
    totals = ThreadTotals(tid=5, pid=1)
    totals.update(raw)  # type: ignore[arg-type]
    # THEN what is there is read, and what is not is zero or None
    assert (totals.wait_ns, totals.hold_ns, totals.acquisitions) == (7, 0, 0)
    assert totals.wait_hist is not None and totals.wait_hist[3] == 2
    assert totals.hold_hist is None
