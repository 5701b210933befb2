"""CPU per exported span in the sidecar's user space, replayed: steadier than
the soak's whole-process figure on a busy machine.

    .venv/bin/python bench/span_cost.py [--seconds 8] [--threads 64] [--rounds 3]

As root. The 64-thread soak app of bench/sidecar.py runs with its context table
published but no sidecar; a Session records the raw ring-buffer records the
probes send for --seconds. Then, in this process, those records go through
exactly what the sidecar does with each one, --rounds times: decode
(events.decode_event), turn into a span and encode it (export.SpanExport), record
its exemplar (metrics.GilMetrics), queue it and export it over OTLP/gRPC with the
SDK's exporter (delivery.SpanDelivery) to a receiver in another process. The
figure is this process's CPU time (every thread, gRPC's included) per event.
Not measured: the kernel side, BCC's ring-buffer poll, the loop's other work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, List, Tuple

from sidecar import APP

from otel_gil.abi import events
from otel_gil.abi.slots import TableLocation
from otel_gil.export import delivery
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.sidecar import spans as export
from otel_gil.sidecar import threads
from otel_gil.sidecar.clock import Clock

RECEIVER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from sidecar import Counts, counting_receiver
counts = Counts()
server, port = counting_receiver(counts)
print(port, flush=True)
sys.stdin.readline()
print(sum(counts.spans.values()), flush=True)
"""


def capture(args: argparse.Namespace) -> Tuple[List[bytes], int, Any]:
    """Raw events of the soak app, its pid, and its threads' published names."""
    raw: List[bytes] = []
    decode = events.decode_event

    def keep(data: bytes, *args: Any) -> events.Interval:
        raw.append(bytes(data))
        return decode(data, *args)

    env = dict(os.environ, OTEL_PYTHON_GIL_MODE="connect",
               OTEL_PYTHON_GIL_SOCKET="/nonexistent/otel-gil-bench.sock")
    app = subprocess.Popen([args.python, "-c", APP, "soak", str(args.threads),
                            str(args.seconds + 30), "0"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    assert app.stdout is not None
    try:
        hello = json.loads(app.stdout.readline())
        events.decode_event = keep  # the probes' ring callback decodes through it
        session = Session(ProbeConfig())
        session.add(app.pid, TableLocation(hello["table"], hello["slots"]))
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            session.step(100)
        names = threads.read_thread_names(app.pid, hello["table"])
        session.close()
    finally:
        events.decode_event = decode
        app.kill()
        app.wait()
    return raw, app.pid, names


def replay(raw: List[bytes], pid: int, names: Any, port: int) -> Tuple[float, int]:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_gil.sidecar.metrics import GilMetrics

    spans = delivery.SpanDelivery(
        lambda: OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True))
    exp = export.SpanExport(Clock(), spans=spans)
    by_tid = {tid: ident_name for tid, ident_name in names.items()}

    class Captured(threads.ThreadDirectory):
        """The names captured while the app ran (it is gone by the replay)."""

        def _lookup(self, tid: int, published: bool) -> threads.ThreadInfo:
            ident, name = by_tid.get(tid, (None, f"thread-{tid}"))
            return threads.ThreadInfo(tid, tid, name, ident)

    directory = Captured(pid, None, lambda tid: None)
    exp.add_process(pid, pid, {"service.name": "soak"}, directory)
    metrics = GilMetrics(("wait", "hold"), [InMemoryMetricReader()])
    metrics.add_process(pid, "soak", pid, directory.name)
    started = time.process_time()
    for data in raw:
        iv = events.decode_event(data)
        metrics.record_interval(iv, exp.on_interval(iv))
    spans.flush(60)
    cpu = time.process_time() - started
    sent = sum(n for (_, _, outcome), n in spans.counts().items() if outcome == "exported")
    spans.close()
    metrics.shutdown()
    return cpu, sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (eBPF)", file=sys.stderr)
        return 1
    raw, pid, names = capture(args)
    with_span = sum(1 for r in raw if events.decode_event(r).span is not None)
    print(f"captured {len(raw)} events in {args.seconds:g} s ({len(raw) / args.seconds:.0f}/s), "
          f"{with_span} under a span, "
          f"{sum(len(events.decode_event(r).holds) for r in raw) / max(1, len(raw)):.1f} "
          "holds each")
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, os.path.dirname(__file__)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert receiver.stdin is not None and receiver.stdout is not None
    try:
        port = int(receiver.stdout.readline())
        best = None
        for r in range(args.rounds):
            events._HOLD_CACHE.clear()
            cpu, sent = replay(raw, pid, names, port)
            per = cpu / len(raw) * 1e6
            best = per if best is None else min(best, per)
            print(f"round {r + 1}: {per:.0f} µs of CPU per event, {sent} spans exported")
        receiver.stdin.write("\n")
        receiver.stdin.flush()
        received = int(receiver.stdout.readline())
    finally:
        receiver.kill()
        receiver.wait()
    print(f"user-space CPU per exported span (best of {args.rounds}): {best:.0f} µs; at 700 "
          f"waits/s that is {best * 700 / 1e4:.1f}% of a core; receiver got {received} spans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
