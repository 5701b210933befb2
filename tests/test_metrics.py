"""Sidecar metrics from a real traced child: names, units and values, read through
an in-memory reader and through a real HTTP scrape of the Prometheus endpoint."""

from __future__ import annotations

import socket
import time
import urllib.request
from typing import Any, Dict, Tuple

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import start_http_server
from targets import all_targets, require, spawn
from test_record import LATE_WORKLOAD, WORKLOAD

from otel_gil import names
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.sidecar import histograms
from otel_gil.sidecar.metrics import GilMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def traced() -> Any:
    """GIVEN a child with 4 CPU-bound threads, traced by a session with metrics."""
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    memory = InMemoryMetricReader()
    port = _free_port()
    start_http_server(port, addr="127.0.0.1")
    child = spawn(target, WORKLOAD)
    try:
        child.read_json(timeout=60)
        intervals: list = []

        def on_interval(iv: Any) -> None:
            intervals.append(iv)
            metrics.record_interval(iv, None)

        # The all set: held seconds are every hold, comparable to CPU time
        session = Session(ProbeConfig(hold_threshold_ns=4_000_000, probes="all"), on_interval)
        metrics = GilMetrics(session.histogram_kinds, [memory, PrometheusMetricReader()])
        target_info = session.add(child.host_pid)
        metrics.add_process(child.host_pid, "metrics-test", target_info.nspid[-1],
                            lambda tid: "main" if tid == child.host_pid else "burner")
        child.send("go")
        result: Dict[str, Any] = {}
        while not result:
            session.step(50)
            metrics.update(session.snapshot())
            try:
                result = child.read_json(timeout=0.05)
            except TimeoutError:
                continue
        session.step(50, refresh=True)  # WHEN the totals are read, once the work is done
        metrics.update(session.snapshot())
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        data = memory.get_metrics_data()
        child.send("exit")
        session.intervals = intervals
        yield session, result, data, scrape.decode()
        session.close()
    finally:
        child.close()


def _points(data: Any) -> Dict[str, Tuple[str, list]]:
    out: Dict[str, Tuple[str, list]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == names.INSTRUMENTATION_SCOPE
            for m in sm.metrics:
                out[m.name] = (m.unit, list(m.data.data_points))
    return out


@pytest.mark.ebpf
def test_every_metric_is_exported_with_its_unit(traced: Any) -> None:
    _, _, data, _ = traced
    points = _points(data)
    # THEN every documented metric is there, with its documented unit
    for metric in names.METRICS:
        assert metric.name in points, metric.name
        assert points[metric.name][0] == metric.unit


def assert_held_seconds(held_s: float, result: Dict[str, Any]) -> None:
    """Held seconds of the burners against their CPU and run-queue time (schedstat):
    a CPU-bound holder keeps the GIL while preempted, so a busy machine adds to
    the hold up to the time spent runnable, never more."""
    cpu_s = sum(result["cpu_ns"].values()) / 1e9
    runnable_s = sum(result["runnable_ns"].values()) / 1e9
    assert 0.95 * cpu_s <= held_s <= 1.05 * cpu_s + runnable_s, (held_s, cpu_s, runnable_s)


@pytest.mark.ebpf
def test_held_seconds_match_the_workloads_cpu_time(traced: Any) -> None:
    session, result, data, _ = traced
    points = _points(data)
    burner = [p for p in points[names.HELD_TIME.name][1]
              if p.attributes[names.LABEL_THREAD] == "burner"]
    assert len(burner) == 1
    assert burner[0].attributes[names.LABEL_SERVICE] == "metrics-test"
    # THEN the burners' held seconds are their CPU time, within a few % (5), plus
    # at most the time they were preempted holding it (test_record.WORKLOAD)
    assert_held_seconds(burner[0].value, result)
    acquisitions = sum(p.value for p in points[names.ACQUISITIONS.name][1])
    assert acquisitions == sum(t.acquisitions for t in session.threads.values())
    forced = sum(p.value for p in points[names.FORCED_SWITCHES.name][1])
    handoffs = sum(p.value for p in points[names.HANDOFFS.name][1])
    assert 0 < forced <= handoffs
    assert sum(p.value for p in points[names.LOST_EVENTS.name][1]) == 0


@pytest.mark.ebpf
def test_the_histograms_hold_every_wait_and_hold(traced: Any) -> None:
    session, _, data, _ = traced
    points = _points(data)
    threads = list(session.threads.values())
    # THEN the wait histogram counts every wait that ended, in seconds
    waits = points[names.WAIT_DURATION.name][1]
    assert sum(p.count for p in waits) == sum(t.waits for t in threads) > 0
    assert sum(p.sum for p in waits) == pytest.approx(sum(t.wait_ns for t in threads) / 1e9,
                                                      rel=1e-9)
    # AND the long ones in it are exactly the waits the probes sent one by one
    bounds = list(waits[0].explicit_bounds)
    above = bounds.index(histograms.EDGES_NS[9] / 1e9) + 1  # 2^20 ns, the "1 ms" edge
    long_waits = [iv for iv in session.intervals if iv.kind == "wait"
                  and iv.duration_ns >= histograms.EDGES_NS[9]]
    assert sum(sum(p.bucket_counts[above:]) for p in waits) == len(long_waits) > 0
    # AND the hold histogram every hold with the all set; with the contended set
    # (which sees holds only while another waits) the long holds sent one by one
    holds = points[names.HOLD_DURATION.name][1]
    if session.probe_set == "all":
        assert sum(p.count for p in holds) == sum(sum(t.hold_hist or []) for t in threads) > 0
        assert sum(p.sum for p in holds) == pytest.approx(sum(t.hold_ns for t in threads) / 1e9,
                                                          rel=1e-9)
    else:
        long_holds = [iv for iv in session.intervals if iv.kind == "hold"]
        assert sum(p.count for p in holds) == len(long_holds) > 0
    assert bounds == list(histograms.BOUNDARIES_S)


@pytest.mark.ebpf
def test_prometheus_scrape_shows_the_documented_series(traced: Any) -> None:
    _, result, data, scrape = traced
    # THEN a real scrape serves each documented series, with the labels
    for metric in names.METRICS:
        series = metric.prometheus + ("_bucket" if metric.instrument == "histogram" else "")
        assert f"\n{series}{{" in scrape, series
    line = next(ln for ln in scrape.splitlines()
                if ln.startswith(names.HELD_TIME.prometheus + "{") and 'thread_name="burner"' in ln)
    assert 'service_name="metrics-test"' in line
    assert_held_seconds(float(line.rsplit(" ", 1)[1]), result)


@pytest.mark.ebpf
def test_dashboard_series_exist_on_a_running_sidecar(tmp_path: Any) -> None:
    """The Grafana dashboard's queries against what a real sidecar serves."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from otlp_receiver import OtlpReceiver
    from test_deployment import _dashboard_exprs

    root = Path(__file__).parent.parent
    port, sock = _free_port(), tmp_path / "gil.sock"
    with OtlpReceiver() as receiver:
        env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                   OTEL_EXPORTER_OTLP_INSECURE="true")
        # GIVEN a long-running sidecar with its Prometheus endpoint, and an app using it
        sidecar = subprocess.Popen([sys.executable, "-m", "otel_gil", "sidecar", "--listen",
                                    str(sock), "--prometheus-port", str(port),
                                    "--hold-threshold-ms", "4"],
                                   env=env, stderr=subprocess.PIPE, text=True)
        try:
            assert sidecar.stderr is not None and "listening" in sidecar.stderr.readline()
            app = subprocess.Popen([sys.executable, str(root / "examples" / "traced_app.py"),
                                    "--seconds", "6"], stdout=subprocess.PIPE, text=True,
                                   env=dict(env, OTEL_PYTHON_GIL_SOCKET=str(sock)))
            assert app.stdout is not None
            assert json.loads(app.stdout.readline())["live"] is True
            time.sleep(5.5)  # past the contention window (5 s)
            # WHEN Prometheus scrapes it, mid-run
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=10).read().decode()
            app.wait(timeout=60)
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(timeout=30)
    served = {line.split("{")[0] for line in scrape.splitlines()
              if line.startswith("otel_gil_")}
    labels = set(re.findall(r'([a-z_]+)="', scrape))
    # THEN every series the dashboard queries is served, with the labels it uses
    for expr in _dashboard_exprs():
        for series in re.findall(r"\botel_gil_[a-z_]+\b", expr):
            assert series in served, (series, sorted(served))
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr)
                   for label in group.split(",")}
        assert grouped <= labels | {""}, (expr, labels)
    assert 'service_name="gil-example"' in scrape


def test_thread_labels_are_bounded_and_exemplars_name_the_wait_span() -> None:

    from otel_gil.abi.events import Interval, SpanRef

    # GIVEN metrics for one process, with room for 2 thread names
    memory = InMemoryMetricReader()
    # (a probe set without kernel histograms: the recorded waits are the histogram)
    metrics = GilMetrics((), [memory], max_thread_labels=2)
    metrics.add_process(100, "svc", 1, lambda tid: f"thread-{tid}")
    span = SpanRef(0xABC, 0xDEF, 1)
    # WHEN waits of 3 different threads are recorded, each with its span
    for tid in (1, 2, 3):
        metrics.record_interval(Interval("wait", 100, tid, 0, 2_000_000, None), span)
    points = _points(memory.get_metrics_data())[names.WAIT_DURATION.name][1]
    # THEN the third thread is folded into "other"
    assert sorted(p.attributes[names.LABEL_THREAD] for p in points) == [
        names.OTHER_THREADS, "thread-1", "thread-2"]
    # AND the exemplars carry the wait span's trace and span id
    exemplars = [e for p in points for e in p.exemplars]
    assert exemplars and all((e.trace_id, e.span_id) == (0xABC, 0xDEF) for e in exemplars)
    metrics.shutdown()


def _sums(memory: InMemoryMetricReader) -> Dict[str, float]:
    points = _points(memory.get_metrics_data())
    return {m.name: sum(p.value for p in points[m.name][1]) if m.name in points else 0.0
            for m in (names.WAITED_TIME, names.ACQUISITIONS, names.HANDOFFS)}


@pytest.mark.ebpf
def test_a_process_forgotten_alive_and_traced_again_is_counted_once() -> None:
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    # GIVEN a process of 3 contending threads, traced with metrics as the sidecar does
    memory = InMemoryMetricReader()
    child = spawn(target, LATE_WORKLOAD)
    session = Session(ProbeConfig())
    metrics = GilMetrics(session.histogram_kinds, [memory])
    try:
        child.read_json(timeout=60)
        pid = child.host_pid

        def trace(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                session.step(50)
                metrics.update(session.snapshot())
            session.step(0, refresh=True)
            metrics.update(session.snapshot())

        def attach() -> None:
            info = session.add(pid)
            metrics.add_process(pid, "forget-test", info.nspid[-1], lambda tid: "burner")

        attach()
        trace(1.0)
        # WHEN it uninstruments: the sidecar detaches, then forgets it (server.py
        # _retire_exited), while its threads live on
        session.detach(pid)
        metrics.update(session.snapshot())
        metrics.forget(pid)
        session.forget(pid)
        at_forget = _sums(memory)
        trace(0.5)
        after_forget = _sums(memory)
        # AND then instruments again: the same pid, attached again
        attach()
        trace(1.0)
        again = _sums(memory)
        new_waited = sum(t.wait_ns for t in session.threads.values() if t.pid == pid) / 1e9
    finally:
        child.send("stop")
        session.close()
        metrics.shutdown()
        child.close()
    # THEN nothing is counted again while it is forgotten (its threads' kernel
    # entries went with it)
    assert at_forget[names.WAITED_TIME.name] > 0.1 and at_forget[names.HANDOFFS.name] > 10
    assert after_forget == at_forget, (at_forget, after_forget)
    # AND traced again, every counter goes on from where it was: the new
    # attach's own totals (from zero) are added, never the old ones twice
    for name, value in at_forget.items():
        assert again[name] > value, (name, at_forget, again)
    assert again[names.WAITED_TIME.name] == pytest.approx(
        at_forget[names.WAITED_TIME.name] + new_waited, rel=1e-6)


def test_the_contention_ratio_goes_on_when_exited_threads_are_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_gil.probes.session import Snapshot
    from otel_gil.probes.totals import ThreadTotals
    from otel_gil.sidecar import metrics as metrics_module

    # GIVEN metrics of a process with two threads that waited 1 s each, 5 s apart
    memory = InMemoryMetricReader()
    metrics = GilMetrics((), [memory])
    metrics.add_process(7, "svc", 7, lambda tid: "t")
    clock = [10**12]
    monkeypatch.setattr(metrics_module.time, "monotonic_ns", lambda: clock[0])

    def snapshot(*threads: ThreadTotals) -> Snapshot:
        return Snapshot({t.tid: t for t in threads}, {}, frozenset({7}), 0)

    metrics.update(snapshot(ThreadTotals(tid=1, pid=7), ThreadTotals(tid=2, pid=7)))
    clock[0] += 5 * 10**9
    gone = ThreadTotals(tid=2, pid=7, wait_ns=10**9, exited=True)
    metrics.update(snapshot(ThreadTotals(tid=1, pid=7, wait_ns=10**9), gone))
    # WHEN the exited one is dropped (Session.drop_exited_threads) and the other
    # waits 0.5 s more in the next 5 s
    metrics.forget_threads([2])
    clock[0] += 5 * 10**9
    metrics.update(snapshot(ThreadTotals(tid=1, pid=7, wait_ns=15 * 10**8)))
    # THEN the ratio is that 0.5 s over 5 s, not negative for the dropped thread's 1 s
    (point,) = _points(memory.get_metrics_data())[names.CONTENTION_RATIO.name][1]
    assert point.value == pytest.approx(0.1)
    metrics.shutdown()


SHORT_THREADS = r"""
import json, sys, threading
def burn():
    for _ in range(2000):
        sum(i * i for i in range(100))
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
for _ in range(10):
    ts = [threading.Thread(target=burn) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
print(json.dumps({"done": True}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.ebpf
def test_exited_threads_are_dropped_once_counted_and_their_time_stays() -> None:
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    # GIVEN a process that runs 10 rounds of 4 short contending threads, traced
    # with metrics, the loop doing after each refresh what the sidecar does
    memory = InMemoryMetricReader()
    child = spawn(target, SHORT_THREADS)
    session = Session(ProbeConfig(), refresh_interval_s=0.2)
    metrics = GilMetrics(session.histogram_kinds, [memory])
    waited: Dict[int, int] = {}
    dropped: list = []
    try:
        child.read_json(timeout=60)
        info = session.add(child.host_pid)
        metrics.add_process(child.host_pid, "drop-test", info.nspid[-1], lambda tid: "burner")

        def settle(refreshes: int = 1) -> None:
            for _ in range(refreshes):
                session.step(0, refresh=True)
                snap = session.snapshot()
                back = set(snap.threads) & set(dropped)
                assert not back, f"dropped threads came back: {back}"
                waited.update({tid: t.wait_ns for tid, t in snap.threads.items()})
                metrics.update(snap)
                gone = session.drop_exited_threads()
                dropped.extend(gone)
                metrics.forget_threads(gone)

        # WHEN all 40 threads have come and gone
        child.send("go")
        while True:
            settle()
            try:
                child.read_json(timeout=0.1)
                break
            except TimeoutError:
                continue
        settle(3)
        points = _points(memory.get_metrics_data())
        total = sum(p.value for p in points[names.WAITED_TIME.name][1])
        kept = dict(session.threads)
    finally:
        child.send("exit")
        session.close()
        metrics.shutdown()
        child.close()
    # THEN the sidecar keeps none of the exited threads' totals
    assert len(set(dropped)) >= 30, (len(dropped), len(waited))
    assert not [t for t in kept.values() if t.exited], kept
    # AND the waited counter still holds every thread's every wait
    assert total == pytest.approx(sum(waited.values()) / 1e9, rel=1e-9), (total, len(waited))


PROMETHEUS = "/usr/bin/prometheus"  # Debian's prometheus package (scripts/test.sh installs it)


def _dashboard_query(expr: str) -> str:
    """A dashboard expression as Grafana would send it for the demo."""
    return (expr.replace("$service", "gil-demo").replace("$__rate_interval", "10s")
            .replace("$__range", "20s"))


def _prometheus_get(port: int, path: str, **params: str) -> Any:
    import json
    import urllib.parse

    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


@pytest.mark.ebpf
def test_a_real_prometheus_answers_every_dashboard_query_for_the_demo(tmp_path: Any) -> None:
    """Every panel of the shipped dashboard has data: a real Prometheus scrapes
    the sidecar of `otel-gil demo`, and each of the dashboard's queries is asked."""
    import math
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_deployment import _dashboard_exprs

    assert os.path.exists(PROMETHEUS), "install Debian's prometheus (scripts/test.sh does)"
    sidecar_port, web = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                      "scrape_configs:\n  - job_name: otel-gil\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{sidecar_port}']\n")
    # GIVEN a real Prometheus scraping, every second, where the demo's sidecar serves
    with open(tmp_path / "prometheus.log", "w") as log:
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=log, stderr=log)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_PYTHON_GIL_PROMETHEUS_PORT"] = str(sidecar_port)
    demo = subprocess.Popen([sys.executable, "-m", "otel_gil", "demo", "--duration", "30",
                             "--output", str(tmp_path / "demo.json")],
                            cwd=Path(__file__).parent.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert demo.stderr is not None
        for line in demo.stderr:
            if "tracing live" in line:
                break
        # WHEN the demo has been under load for 15 s (past the contention window,
        # rate windows over 10 live scrapes), each dashboard query is asked
        time.sleep(15)
        answers = {expr: _prometheus_get(web, "/api/v1/query", query=_dashboard_query(expr))
                   for expr in _dashboard_exprs() if not expr.startswith("label_values(")}
        services = _prometheus_get(web, "/api/v1/label/service_name/values",
                                   **{"match[]": "otel_gil_acquisitions_total"})
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
        prom.terminate()
        prom.wait(30)
    assert demo.returncode == 0, err[-2000:]
    # THEN every query answers with at least one number
    for expr, answer in answers.items():
        assert answer["status"] == "success", (expr, answer)
        values = [float(r["value"][1]) for r in answer["data"]["result"]]
        assert any(not math.isnan(v) for v in values), (expr, answer["data"])
    # AND the service variable offers the demo's service
    assert "gil-demo" in services["data"]
