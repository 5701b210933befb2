"""Pre-fork servers and forking apps, for real: gunicorn + Flask under
`opentelemetry-instrument` loaded over HTTP, multiprocessing (fork, forkserver),
children forked at every stage of the sidecar's start, grandchildren, an
orphaned child, and 100 short-lived forks in a row. Spans are checked at the
real OTLP receiver; the apps are examples/flask_app.py and tests/prefork_app.py.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import pytest
from otlp_receiver import OtlpReceiver, SpanRecord

from otel_gil import names

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
APP = Path(__file__).parent / "prefork_app.py"
SERVER = 2  # opentelemetry-proto Span.SpanKind SPAN_KIND_SERVER
BOOTED = re.compile(r"Booting worker with pid: (\d+)")
TRACING = re.compile(r"otel-gil: tracing pid (\d+)")


def _env(receiver: OtlpReceiver, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_INSECURE="true",
               OTEL_BSP_SCHEDULE_DELAY="200", OTEL_PYTHON_GIL_PROMETHEUS_PORT="0",
               OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    env.update(extra)
    return env


def _waits(spans: List[SpanRecord]) -> List[SpanRecord]:
    return [s for s in spans if s.name == names.GIL_WAIT.name]


def _pids_with_waits(spans: List[SpanRecord]) -> Set[int]:
    return {s.attributes[names.PROCESS_PID.name] for s in _waits(spans)}


def _assert_nested_in_parents(spans: List[SpanRecord], parent_kind: int = -1) -> None:
    """Zero orphans: every gil.wait's parent arrived, in the same trace, around it."""
    by_id = {s.span_id: s for s in spans}
    for w in _waits(spans):
        parent = by_id.get(w.parent_span_id)
        assert parent is not None, f"orphan gil.wait {w.span_id} of pid " \
                                   f"{w.attributes[names.PROCESS_PID.name]}"
        assert parent.trace_id == w.trace_id
        assert parent_kind < 0 or parent.kind == parent_kind, (parent.name, parent.kind)
        slack = w.attributes[names.CLOCK_UNCERTAINTY_NS.name]
        assert parent.start_ns - slack <= w.start_ns < w.end_ns <= parent.end_ns + slack


def _problems(log: str) -> List[str]:
    """otel-gil's log lines that report a problem (not 'tracing pid N'), with
    numbers masked, so the same problem for many pids reads the same."""
    lines = [line for line in log.splitlines() if "otel-gil" in line or "Traceback" in line]
    lines = [line for line in lines if not TRACING.search(line)
             and "could be traced" not in line]
    return [re.sub(r"\d+", "N", line) for line in lines]


# ------------------------------------------------------------------- gunicorn


class Gunicorn:
    """`opentelemetry-instrument gunicorn ... flask_app:app` on a free port, its
    stderr (gunicorn's log and the sidecar's) collected line by line."""

    def __init__(self, receiver: OtlpReceiver, args: List[str]) -> None:
        cmd = [str(BIN / "opentelemetry-instrument"), str(BIN / "gunicorn"),
               "-b", "127.0.0.1:0", "--no-control-socket", "--chdir", str(ROOT / "examples"),
               "-w", "2", *args, "flask_app:app"]
        self.proc = subprocess.Popen(cmd, env=_env(receiver, OTEL_SERVICE_NAME="gil-flask"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: List[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        port = self.wait_for(lambda: [m for line in self.lines for m in
                                      re.findall(r"Listening at: http://127.0.0.1:(\d+)", line)])
        self.url = f"http://127.0.0.1:{port[0]}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, found: Any, timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not found():
                assert self.proc.poll() is None, "\n".join(self.lines)
                assert time.monotonic() < deadline, "\n".join(self.lines[-40:])
                self._changed.wait(0.5)
            return found()

    def pids(self, pattern: re.Pattern[str]) -> List[int]:
        with self._changed:
            return [int(m.group(1)) for line in self.lines for m in [pattern.search(line)] if m]

    def sidecar(self) -> int:
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                        if b"\0sidecar\0--owner-fd" in cmdline.read():
                            return int(child)
        raise AssertionError("no sidecar among the master's children")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        time.sleep(0.2)  # the reader thread drains the last lines
        with self._changed:
            return "\n".join(self.lines)


def _load(url: str, enough: Any, clients: int = 4, timeout: float = 60) -> Dict[int, int]:
    """GET /work from `clients` threads until enough(served) or timeout. served:
    per worker pid, the requests it answered while its GIL tracing was live."""
    served: Dict[int, int] = collections.Counter()
    errors: List[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{url}/work", timeout=30) as r:
                    answer = json.load(r)
            except OSError as exc:
                errors.append(str(exc))
                continue
            served[answer["pid"]] += 1 if answer["live"] else 0

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not enough(served) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    return dict(served)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _assert_exits(pid: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


WORKERS = {
    "gthread": ["-k", "gthread", "--threads", "4", "--max-requests", "20"],
    # sync workers that drop root for nobody after the fork (gunicorn --user)
    "sync-as-nobody": ["-k", "sync", "--max-requests", "20", "--user", "nobody",
                       "--group", "nogroup"],
}


@pytest.mark.ebpf
@pytest.mark.parametrize("kind", list(WORKERS))
def test_gunicorn_workers_are_traced_through_recycling(kind: str) -> None:
    with OtlpReceiver() as receiver:
        # GIVEN gunicorn under opentelemetry-instrument: 2 workers forked while the
        # master's sidecar was still starting, recycled every 20 requests
        server = Gunicorn(receiver, WORKERS[kind])
        try:
            first = server.wait_for(lambda: server.pids(BOOTED)[:2] if len(
                server.pids(BOOTED)) >= 2 else None)
            # THEN the first workers get traced once the sidecar is up, with no restart
            server.wait_for(lambda: set(first) <= set(server.pids(TRACING)))
            sidecar = server.sidecar()
            # WHEN real HTTP load makes them recycle: 6 workers served, traced, at least
            served = _load(server.url, lambda s: sum(n >= 2 for n in s.values()) >= 6)
        finally:
            log = server.stop()
        # THEN every worker that served requests while traced sent gil.wait spans,
        # the first ones (forked before the sidecar listened) and recycled ones alike
        traced = {pid for pid, n in served.items() if n >= 2}
        assert len(traced) >= 6, served
        assert set(first) <= traced
        spans = receiver.wait_for_spans(lambda spans: _pids_with_waits(spans) >= traced,
                                        timeout=30)
        # AND each wait is a child of a Flask server span of that worker's request
        _assert_nested_in_parents(spans, parent_kind=SERVER)
        by_id = {s.span_id: s for s in spans}
        assert {by_id[w.parent_span_id].name for w in _waits(spans)} == {"GET /work"}
        # AND every worker booted was registered with the one sidecar, which said
        # not a word of trouble, and left with gunicorn
        booted = set(server.pids(BOOTED))
        assert set(served) <= booted
        assert booted - set(server.pids(TRACING)) <= booted - set(served), log
        assert not _problems(log), log
        _assert_exits(sidecar, "the sidecar outlived gunicorn")


# ------------------------------------------------------------- forking apps


def _run(receiver: OtlpReceiver, mode: str, *prefix: str) -> Tuple[List[Dict[str, Any]], str]:
    proc = subprocess.run([*prefix, sys.executable, str(APP), mode],
                          env=_env(receiver, OTEL_SERVICE_NAME="prefork-app"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


@pytest.mark.ebpf
def test_children_forked_at_every_stage_of_the_sidecar_start_are_traced() -> None:
    with OtlpReceiver() as receiver:
        # GIVEN children forked right after instrument(), while the sidecar started,
        # and once it was live; two of them fork a grandchild
        reports, log = _run(receiver, "timing")
        children = [r for r in reports if "child" in r]
        pids = {r["pid"] for r in children}
        assert sorted(r["child"] for r in children) == [
            "after", "after-grandchild", "before", "before-grandchild", "starting"]
        # THEN none waited for tracing at its fork, and every one got traced
        assert all(r["live"] and r["status"] is None for r in children), children
        early = [r for r in children if r["child"] in ("before", "starting")]
        assert not any(r["live_at_fork"] for r in early), early
        spans = receiver.wait_for_spans(lambda spans: _pids_with_waits(spans) >= pids, 30)
        _assert_nested_in_parents(spans)
        by_id = {s.span_id: s for s in spans}
        for w in _waits(spans):
            label = by_id[w.parent_span_id].name.rsplit("-", 1)[0]
            pid = w.attributes[names.PROCESS_PID.name]
            assert next(r["child"] for r in children if r["pid"] == pid) == label
        assert not _problems(log), log


@pytest.mark.ebpf
def test_a_daemonized_app_stays_traced() -> None:
    with OtlpReceiver() as receiver:
        # GIVEN a traced app that daemonizes: fork, exit; fork, exit (gunicorn --daemon)
        # (subprocess.run returns once the daemon and the sidecar have closed stderr)
        reports, log = _run(receiver, "orphan")
        parent = next(r for r in reports if "parent" in r)
        daemon = next(r for r in reports if r.get("child") == "daemon")
        # THEN the daemon, whose parents had both exited, was traced
        assert daemon["ppid"] != parent["pid"]
        assert daemon["live"] is True and daemon["status"] is None, daemon
        spans = receiver.wait_for_spans(lambda s: daemon["pid"] in _pids_with_waits(s), 30)
        _assert_nested_in_parents(spans)
        # AND the sidecar exited after it, as the last process it traced did
        _assert_exits(parent["sidecar"], "the sidecar outlived the daemon")
        assert not _problems(log), log


@pytest.mark.ebpf
def test_multiprocessing_fork_and_forkserver_children_join_one_sidecar() -> None:
    with OtlpReceiver() as receiver:
        # GIVEN an app with no otel-gil code, under opentelemetry-instrument, whose
        # children come from fork and from a forkserver (an exec'd Python, itself
        # instrumented by opentelemetry-instrument's sitecustomize)
        reports, log = _run(receiver, "mp", str(BIN / "opentelemetry-instrument"))
        (parent,) = reports
        children = parent["children"]
        assert sorted(c["method"] for c in children) == ["fork"] * 2 + ["forkserver"] * 2
        forkserver = {c["ppid"] for c in children if c["method"] == "forkserver"}
        assert len(forkserver) == 1 and parent["pid"] not in forkserver
        # THEN every child is traced, by the app's one sidecar (none of their own)
        assert all(c["live"] and c["status"] is None for c in children), children
        assert len(parent["sidecars"]) == 1, parent
        pids = {c["pid"] for c in children}
        spans = receiver.wait_for_spans(lambda spans: _pids_with_waits(spans) >= pids, 30)
        _assert_nested_in_parents(spans)
        assert not _problems(log), log


@pytest.mark.ebpf
def test_a_hundred_short_lived_forks_in_a_row() -> None:
    with OtlpReceiver() as receiver:
        # GIVEN a traced app WHEN it forks 100 children in a row, each exiting
        # at once or within 300 ms
        reports, log = _run(receiver, "storm")
        (parent,) = reports
        # THEN the app ran through and exited normally (checked by _run), still traced
        assert parent["live"] and parent["still_live"] and parent["status"] is None
        assert parent["sidecar_alive"]
        # AND the sidecar still traced the app's own work after the storm
        spans = receiver.wait_for_spans(
            lambda spans: parent["pid"] in _pids_with_waits(spans), 30)
        by_id = {s.span_id: s for s in spans}
        after = [w for w in _waits(spans) if w.attributes[names.PROCESS_PID.name] ==
                 parent["pid"] and by_id[w.parent_span_id].name.startswith("after-storm-")]
        assert after
        _assert_nested_in_parents(spans)
        # AND none of the app's own spans was lost
        own = {s.name for s in spans if s.scope == "prefork-app"}
        assert {"storm", "after-storm-0", "after-storm-1"} <= own, own
        # AND it said at most one line per problem (none expected), no traceback
        problems = _problems(log)
        assert len(problems) == len(set(problems)), log
        assert "Traceback" not in log


@pytest.mark.ebpf
def test_a_stale_parent_socket_falls_back_to_a_sidecar_of_its_own() -> None:
    # GIVEN a privileged app started with the address of an ancestor's sidecar
    # that is gone (an instrumented parent that exited before starting it)
    code = "import otel_gil; otel_gil.instrument(); print(otel_gil.wait_until_live(60))"
    with OtlpReceiver() as receiver:
        env = _env(receiver, OTEL_PYTHON_GIL_PARENT_SOCKET="@otel-gil-1-0123456789abcdef")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
    # THEN it spawns its own sidecar and is traced, with not a word of trouble
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"]
    assert not _problems(proc.stderr), proc.stderr
