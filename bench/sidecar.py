"""The sidecar's own cost: CPU per exported span and per traced thread, and memory.

    .venv/bin/python bench/sidecar.py [--seconds 60] [--threads 64] [--pause-ms 0]
                                      [--endpoint receiver]
    .venv/bin/python bench/sidecar.py --breakdown

As root. A child app (PYTHON, default the one running this script) calls
`otel_gil.instrument()`, which spawns its private sidecar; this script samples
that sidecar's CPU time (utime + stime of /proc/PID/stat, every thread) and its
RssAnon (/proc/PID/status) once a second, and counts what reaches an OTLP/gRPC
receiver it runs itself. Phases, one after the other:

  idle-1     one app thread, parked: the sidecar's floor
  idle-N     --idle-threads threads that took the GIL once, then parked
             (both measured from 6 s after start, the threads' start-up done)
  soak       --threads threads, each looping over short spans of Python work plus
             zlib.compress (about 700 gil.wait spans/s at 64 threads when the
             goals were set; 1900/s now that the probes cost less); --pause-ms
             sleeps between spans, to run the soak at a given load

Printed: per phase the sidecar's CPU as % of one core, spans received, RssAnon
(first, min, max, last, and the slope of a line fitted to the samples after the
first 10 s), and the sidecar's own drop counters scraped from its Prometheus
endpoint; then CPU per exported span (soak minus idle-N, over the spans) and
per traced thread ((idle-N minus idle-1) / (N - 1)).

--endpoint: `receiver` (default), `down` (a closed port) or `blackhole` (a TCP
listener that accepts and never answers): the drop counters and the memory
bound, with nothing delivered.

--breakdown: RssAnon of a fresh interpreter after each step of a sidecar's
start-up (import bcc, compile and load the BPF program, import the
OpenTelemetry SDK and OTLP exporters, build the Sidecar), for bench/README.md.

Only ratios and orders of magnitude mean anything on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

APP = r"""
import json, os, sys, threading, time, zlib
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
import otel_gil

mode, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pause = float(sys.argv[4]) / 1000  # --pause-ms: each soak thread's sleep between spans
# The app's own spans are sampled but go nowhere: only the sidecar's are measured.
trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": "soak"})))
tracer = trace.get_tracer("soak")
payload = bytes(range(256)) * 16 + os.urandom(1024)
stop, parked = threading.Event(), threading.Event()

def work():
    while not stop.is_set():
        with tracer.start_as_current_span("work"):
            sum(i * i for i in range(300))
            zlib.compress(payload, 6)
        if pause:
            time.sleep(pause)

def park():
    with tracer.start_as_current_span("parked"):
        parked.wait()

otel_gil.instrument()
live = otel_gil.wait_until_live(60)
pool = [threading.Thread(target=work if mode == "soak" else park, name=f"{mode}-{i}")
        for i in range(threads)]
for t in pool:
    t.start()
from otel_gil.app import context
table = context.current_table()
print(json.dumps({"live": live, "status": otel_gil.status(),
                  "sidecar": otel_gil._agent.sidecar.pid if live else None,
                  "table": table.address, "slots": table.slots}), flush=True)
time.sleep(seconds)
stop.set(); parked.set()
for t in pool:
    t.join()
print(json.dumps({"done": True}), flush=True)
"""

BREAKDOWN = r"""
import json, os, sys

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) // 1024

steps = [("python", rss_anon())]
import bcc
steps.append(("import bcc (libbcc, its LLVM and clang)", rss_anon()))
import opentelemetry.sdk.metrics, opentelemetry.sdk.trace
import opentelemetry.exporter.prometheus, prometheus_client
from otel_gil.export import otlp
steps.append(("import the OpenTelemetry SDK, OTLP/gRPC, Prometheus", rss_anon()))
exporters = [otlp.exporter("traces"), otlp.exporter("metrics")]
steps.append(("create the OTLP exporters (gRPC channels)", rss_anon()))
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.loader import Probes
probes = Probes(ProbeConfig(), lambda iv: None)
steps.append(("compile and load the BPF program (clang/LLVM in process)", rss_anon()))
from otel_gil.sidecar.host import trim_heap
trim_heap()
steps.append(("malloc_trim: what LLVM freed goes back", rss_anon()))
print(json.dumps(steps))
"""


# -------------------------------------------------------------------- receiver


@dataclass
class Counts:
    spans: Dict[str, int] = field(default_factory=dict)
    metric_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_spans(self, request: Any) -> None:
        got: Dict[str, int] = {}
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    got[span.name] = got.get(span.name, 0) + 1
        with self.lock:
            for name, n in got.items():
                self.spans[name] = self.spans.get(name, 0) + n

    def take(self) -> Dict[str, int]:
        with self.lock:
            out, self.spans = self.spans, {}
        return out


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def Export(self, request: Any, context: Any) -> Any:
        self.counts.add_spans(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def Export(self, request: Any, context: Any) -> Any:
        self.counts.metric_requests += 1
        return metrics_service_pb2.ExportMetricsServiceResponse()


def counting_receiver(counts: Counts) -> Tuple[Any, int]:
    """An OTLP/gRPC server that only counts spans by name (keeps nothing)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(counts), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(counts), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class BlackHole:
    """A TCP listener that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ measuring


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14, 15


def rss_anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kb / 1024


def slope(samples: List[Tuple[float, float]]) -> float:
    """Least-squares slope, MB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


def scrape(port: int) -> Dict[str, float]:
    """The sidecar's otel_gil_* drop and delivery counters, summed per series and reason."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    except OSError:
        return {}
    out: Dict[str, float] = {}
    for line in text.decode().splitlines():
        m = re.match(r'(otel_gil_(?:spans|context|lost)[a-z_]*?)(?:\{([^}]*)\})? (\S+)$', line)
        if not m:
            continue
        reason = re.search(r'reason="([^"]*)"', m.group(2) or "")
        key = m.group(1) + (f"[{reason.group(1)}]" if reason else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


@dataclass
class Phase:
    name: str
    seconds: float
    cpu_s: float = 0.0
    spans: Dict[str, int] = field(default_factory=dict)
    rss: List[Tuple[float, float]] = field(default_factory=list)
    counters: Dict[str, float] = field(default_factory=dict)
    cold: bool = False  # the interpreter was inspected from scratch (no discovery cache)
    lost: List[float] = field(default_factory=list)  # kernel events lost, every 5 s

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.seconds

    def line(self) -> str:
        mbs = [v for _, v in self.rss] or [0.0]
        steady = [(t, v) for t, v in self.rss if t >= 10] or self.rss
        spans = ", ".join(f"{n} {k}" for k, n in sorted(self.spans.items())) or "no spans"
        lost = [b - a for a, b in zip([0.0, *self.lost], self.lost)]
        return (f"{self.name:8s} {self.seconds:5.0f} s  sidecar CPU {self.cpu_pct:5.1f}% of a "
                f"core  {spans}; discovery {'cold' if self.cold else 'warm'}; RssAnon MB "
                f"first {mbs[0]:.1f} min {min(mbs):.1f} max {max(mbs):.1f} last {mbs[-1]:.1f} "
                f"slope {slope(steady):+.2f} MB/min; "
                f"kernel events lost per 5 s: {' '.join(f'{x:g}' for x in lost) or '-'}")


def run_phase(args: argparse.Namespace, name: str, mode: str, threads: int, seconds: float,
              env: Dict[str, str], counts: Counts, prom_port: int) -> Phase:
    cold = not any(Path(env["XDG_CACHE_HOME"]).rglob("*.json"))
    app = subprocess.Popen([args.python, "-c", APP, mode, str(threads), str(seconds),
                            str(args.pause_ms)],
                           env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert app.stdout is not None
    try:
        hello = json.loads(app.stdout.readline())
        if not hello.get("live"):
            raise SystemExit(f"bench: tracing did not start: {hello}")
        pid = int(hello["sidecar"])
        print(f"bench: {name}: app pid {app.pid}, sidecar pid {pid}", file=sys.stderr, flush=True)
        # Start-up (compile, attach, the threads' first contention) is not measured.
        settle = 2.0 if mode == "soak" else 6.0
        time.sleep(settle)
        counts.take()
        # ...nor its end: the last scrape must find the sidecar still serving.
        phase = Phase(name, seconds - settle - 2.0, cold=cold)
        start, cpu0 = time.monotonic(), cpu_s(pid)
        while time.monotonic() - start < phase.seconds:
            time.sleep(1)
            phase.rss.append((time.monotonic() - start, rss_anon_mb(pid)))
            if mode == "soak" and len(phase.rss) % 5 == 0:  # a scrape costs a collection
                phase.lost.append(scrape(prom_port).get("otel_gil_lost_events_total", 0.0))
        phase.cpu_s = cpu_s(pid) - cpu0
        phase.seconds = time.monotonic() - start
        phase.counters = scrape(prom_port)
        phase.spans = counts.take()
        app.stdout.readline()
        app.wait(60)
        wait_gone(pid, 30)  # its last flush, to a receiver still listening
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    return phase


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)


def free_port() -> int:
    return closed_port()


def bench(args: argparse.Namespace) -> int:
    counts = Counts()
    server, port = counting_receiver(counts)
    hole = BlackHole() if args.endpoint == "blackhole" else None
    target = {"receiver": port, "down": closed_port(),
              "blackhole": hole.port if hole else 0}[args.endpoint]
    prom_port = free_port()
    # A private discovery cache (otel_gil/target/cache.py keeps one per interpreter
    # build under XDG_CACHE_HOME): the first phase inspects the interpreter from
    # scratch ("cold"), the others find it there ("warm"), as a second run would.
    cache = tempfile.mkdtemp(prefix="otel-gil-bench-cache-")
    env = dict(os.environ, XDG_CACHE_HOME=cache,
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{target}",
               OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_PYTHON_GIL_MODE="spawn",
               OTEL_PYTHON_GIL_PROMETHEUS_PORT=str(prom_port), OTEL_SERVICE_NAME="soak")
    phases: List[Phase] = []
    try:
        if not args.soak_only:
            phases.append(run_phase(args, "idle-1", "idle", 1, args.idle_seconds, env, counts,
                                    prom_port))
            print(phases[-1].line(), flush=True)
            phases.append(run_phase(args, f"idle-{args.idle_threads}", "idle",
                                    args.idle_threads, args.idle_seconds, env, counts,
                                    prom_port))
            print(phases[-1].line(), flush=True)
        phases.append(run_phase(args, "soak", "soak", args.threads, args.seconds, env, counts,
                                prom_port))
        print(phases[-1].line(), flush=True)
    finally:
        server.stop(None)
        if hole:
            hole.close()
        shutil.rmtree(cache, ignore_errors=True)
    soak = phases[-1]
    print("soak counters: " + (", ".join(f"{k} {v:g}" for k, v in sorted(soak.counters.items()))
                               or "none scraped"))
    exported = sum(soak.spans.values())
    if len(phases) == 3:
        idle1, idlen = phases[0], phases[1]
        per_thread = (idlen.cpu_pct - idle1.cpu_pct) / (args.idle_threads - 1)
        print(f"per traced thread (idle): {per_thread * 10:.3f} ms of CPU per second "
              f"({per_thread:.4f}% of a core)")
        base = idlen.cpu_s / idlen.seconds
    else:
        base = 0.0
    if exported:
        per_span = (soak.cpu_s - base * soak.seconds) / exported
        print(f"per exported span (soak): {per_span * 1e6:.0f} µs of sidecar CPU "
              f"({exported / soak.seconds:.0f} spans/s)")
    return 0


def breakdown(args: argparse.Namespace) -> int:
    out = subprocess.run([args.python, "-c", BREAKDOWN], capture_output=True, text=True,
                         env=dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"))
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return 1
    last = 0
    for step, mb in json.loads(out.stdout.splitlines()[-1]):
        print(f"{step:58s} RssAnon {mb:4d} MB  (+{mb - last})")
        last = mb
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--idle-seconds", type=float, default=20)
    parser.add_argument("--idle-threads", type=int, default=256)
    parser.add_argument("--endpoint", choices=("receiver", "down", "blackhole"),
                        default="receiver")
    parser.add_argument("--soak-only", action="store_true")
    parser.add_argument("--pause-ms", type=float, default=0,
                        help="each soak thread sleeps this long between spans (sets the load)")
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args(argv)
    if args.pause_ms < 0:
        parser.error("--pause-ms must be 0 or more")
    if os.geteuid() != 0:
        print("bench: needs root (eBPF)", file=sys.stderr)
        return 1
    return breakdown(args) if args.breakdown else bench(args)


if __name__ == "__main__":
    sys.exit(main())
