"""The fault matrix (issue 7, section 5): a real app under otel_gil.instrument()
(spawn mode, as root, real probes) meets a fault. In every case the app keeps
running, exits normally (status 0) with its own output and its own spans
complete, and logs at most one line.

The app is tests/fault_app.py, driven through its stdin. Its log lines start
with "app: "; its spawned sidecar shares its stderr with lines of its own.
Forked children in a row are covered with the pre-fork tests.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from bpf_maps import SidecarMaps
from otlp_receiver import MetricRecord, OtlpReceiver

from otel_gil import names
from otel_gil.abi import buckets
from otel_gil.errors import TargetGone
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session

APP = Path(__file__).parent / "fault_app.py"
WENT_AWAY = "app: otel-gil: GIL tracing off: the sidecar went away; GIL tracing stopped, " \
            "the app carries on"


class App:
    """fault_app.py running under instrument(), with its stdout and stderr read
    by threads (the sidecar keeps stderr open after the app exits)."""

    def __init__(self, sidecar_endpoint: str, app_endpoint: Optional[str], **env: str) -> None:
        full = dict(os.environ, OTEL_PYTHON_GIL_MODE="spawn", OTEL_PYTHON_GIL_PROMETHEUS_PORT="0",
                    OTEL_EXPORTER_OTLP_ENDPOINT=sidecar_endpoint,
                    OTEL_EXPORTER_OTLP_INSECURE="true", OTEL_BSP_SCHEDULE_DELAY="200", **env)
        full.pop("APP_OTLP_ENDPOINT", None)
        if app_endpoint:
            full["APP_OTLP_ENDPOINT"] = app_endpoint
        self.proc = subprocess.Popen([sys.executable, str(APP)], env=full, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.replies: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.stderr: List[str] = []
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()
        self.sidecar: Optional[int] = None
        self._sidecar_started: Optional[str] = None

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def reply(self, timeout: float = 60) -> Dict[str, Any]:
        return self.replies.get(timeout=timeout)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def find_sidecar(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.sidecar is None:
            kids = _children(self.proc.pid)
            if kids:
                self.sidecar = kids[0]
                self._sidecar_started = _start_time(kids[0])
            else:
                assert time.monotonic() < deadline, "no sidecar was spawned"
                time.sleep(0.005)
        return self.sidecar

    def finish(self, timeout: float = 60) -> Dict[str, Any]:
        """Tell the app to exit; its last reply (with the count of spans it made)."""
        self.send("exit")
        last = self.reply(timeout)
        assert self.proc.wait(timeout) == 0, self.stderr
        return last

    def wait_for_sidecar_exit(self, timeout: float = 30) -> bool:
        """True once the sidecar is gone and stderr is closed (every line read)."""
        self._readers[1].join(timeout)
        return not self._readers[1].is_alive()

    def app_lines(self) -> List[str]:
        """What the app itself logged (its logger prefixes "app: ")."""
        return [line for line in self.stderr if line.startswith("app: ")]

    def kill(self) -> None:
        """End the app and its sidecar if still running (the sidecar only while its
        pid is still that process: same start time)."""
        if self.sidecar is not None and _start_time(self.sidecar) == self._sidecar_started:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(self.sidecar, sig)
                except ProcessLookupError:
                    pass
        self.proc.kill()
        self.proc.wait()
        for reader in self._readers:
            reader.join(10)


def _start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat: tells a process from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


@pytest.fixture
def apps() -> Iterator[List[App]]:
    """Started apps are listed here; whatever a failed test leaves is killed."""
    started: List[App] = []
    yield started
    for app in started:
        app.kill()


def _start(apps: List[App], sidecar_endpoint: str, app_endpoint: Optional[str] = None,
           live: bool = True, **env: str) -> App:
    app = App(sidecar_endpoint, app_endpoint, **env)
    apps.append(app)
    hello = app.reply()
    assert hello["pid"] == app.proc.pid
    if live:
        assert hello["live"] is True, (hello, app.stderr)
    app.find_sidecar()
    return app


def _app_spans(receiver: OtlpReceiver) -> int:
    return sum(1 for s in receiver.spans() if s.scope == "fault-app" and s.name != "main")


def _no_traceback(app: App) -> None:
    assert not [line for line in app.stderr if "Traceback" in line], app.stderr


# ------------------------------------------------------------------- the sidecar dies


class HeldExports(OtlpReceiver):
    """Holds the first trace export that carries GIL spans until released, so a
    signal sent meanwhile lands in the middle of an export RPC."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def _store(self, requests: List[Any], request: Any) -> None:
        if requests is self.trace_requests and not self.holding.is_set() and any(
                span.name == names.GIL_WAIT.name for rs in request.resource_spans
                for ss in rs.scope_spans for span in ss.spans):
            self.holding.set()
            self.release.wait(60)
        super()._store(requests, request)


@pytest.mark.ebpf
def test_sidecar_sigkilled_mid_export(apps: List[App]) -> None:
    with HeldExports() as receiver:
        app = _start(apps, receiver.endpoint, receiver.endpoint)
        # GIVEN an app whose waits are being exported, one export held in flight
        app.send("burn 3 4")
        assert receiver.holding.wait(30), app.stderr
        # WHEN its sidecar is SIGKILLed in the middle of that export
        assert app.sidecar is not None
        os.kill(app.sidecar, signal.SIGKILL)
        killed_at = time.monotonic()
        receiver.release.set()
        # THEN the app keeps working (spans end after the kill), exits 0 with all
        # of its own spans delivered, and says once that tracing stopped
        burned = app.reply()
        assert burned["last_span_end"] > killed_at
        made = app.finish()["exit"]
        assert made == sum(burned["burned"].values()) and _app_spans(receiver) == made
        assert app.wait_for_sidecar_exit()
        _no_traceback(app)
        assert app.app_lines() == [WENT_AWAY]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


STOP_S = 10.0


@pytest.mark.ebpf
def test_sidecar_sigstopped_for_10_s(apps: List[App]) -> None:
    with OtlpReceiver() as receiver:
        app = _start(apps, receiver.endpoint, receiver.endpoint)
        assert app.sidecar is not None
        # GIVEN a live app WHEN its sidecar is stopped (SIGSTOP) for 10 s
        os.kill(app.sidecar, signal.SIGSTOP)
        stopped_at, stopped_ns = time.monotonic(), time.time_ns()
        # THEN, all while it is stopped: the app's threads make spans in contention
        # (OpenTelemetry attach/detach publish into its context table, no sidecar
        # involved), uninstrument() returns at once, and the app exits normally
        app.send("burn 3 2")
        burned = app.reply()
        app.send("uninstrument")
        undone = app.reply()
        assert undone["status"] == "not instrumented" and undone["uninstrumented"] < 2.0
        made = app.finish()["exit"]
        assert time.monotonic() < stopped_at + STOP_S and _state(app.sidecar) == "T"
        # AND when the sidecar is continued it exports what the probes kept for it
        # meanwhile (it was not killed) and exits by itself
        time.sleep(max(0.0, stopped_at + STOP_S - time.monotonic()))
        os.kill(app.sidecar, signal.SIGCONT)
        assert app.wait_for_sidecar_exit()
        spans = receiver.spans()
        by_id = {s.span_id: s for s in spans}
        waits = [s for s in spans if s.name == names.GIL_WAIT.name and s.start_ns >= stopped_ns]
        assert {by_id[w.parent_span_id].name for w in waits} >= set(burned["burned"])
        assert made == sum(burned["burned"].values()) and _app_spans(receiver) == made
        _no_traceback(app)
        assert app.app_lines() == []


@pytest.fixture
def unreachable(request: Any) -> Iterator[str]:
    """An OTLP endpoint nobody answers: a closed port (connection refused), or a
    black hole (a listener that never accepts: the TCP handshake completes in the
    kernel's backlog, then nothing ever answers)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if request.param == "blackhole":
        listener.listen(1)
    else:
        listener.close()
    yield f"http://127.0.0.1:{port}"
    listener.close()


@pytest.mark.ebpf
@pytest.mark.parametrize("unreachable", ["refused", "blackhole"], indirect=True)
def test_otlp_endpoint_unreachable(apps: List[App], unreachable: str) -> None:
    with OtlpReceiver() as receiver:
        # GIVEN an app whose sidecar exports to an endpoint nobody answers
        app = _start(apps, unreachable, receiver.endpoint)
        # WHEN the app works in contention (waits the sidecar cannot export), then exits
        app.send("burn 3 2")
        burned = app.reply()
        made = app.finish()["exit"]
        # THEN the app is unaffected: its own spans all delivered, nothing logged.
        # (The sidecar's side, counting and reporting what it could not export,
        # is tested with the exporter drops; it is killed here once the app is done.)
        assert made == sum(burned["burned"].values()) and _app_spans(receiver) == made
        _no_traceback(app)
        assert app.app_lines() == []


# ------------------------------------------------------------------- the target exits


@pytest.mark.ebpf
@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_target_exits_mid_attach(apps: List[App], reaped: bool) -> None:
    with OtlpReceiver() as receiver:
        # GIVEN an app that registered with its spawned sidecar, which is held
        # (SIGSTOP) before it has attached
        app = _start(apps, receiver.endpoint, receiver.endpoint, live=False, APP_WAIT_LIVE="0")
        assert app.sidecar is not None
        os.kill(app.sidecar, signal.SIGSTOP)
        # WHEN the app exits meanwhile (and is left a zombie, or reaped)
        app.send("exit")
        assert app.reply()["exit"] == 0
        pid = app.proc.pid
        if reaped:
            assert app.proc.wait(60) == 0
        else:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        # AND the sidecar then reads the registration and attaches to what is left
        os.kill(app.sidecar, signal.SIGCONT)
        # THEN the sidecar refuses in one line and exits by itself; the app exited 0
        assert app.wait_for_sidecar_exit()
        assert app.proc.wait(60) == 0
        _no_traceback(app)
        assert app.stderr == ["otel-gil: 1 registered process exited before it could be traced"]


@pytest.mark.ebpf
@pytest.mark.parametrize("when", ["before", "after"])
def test_target_exits_while_its_probes_are_attached(when: str) -> None:
    """The sidecar's Session.add() when its target exits between inspection and
    uprobe attach, or during the attach (the instrument() case above cannot
    choose its moment so finely)."""
    session = Session(ProbeConfig())
    target = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert target.stdout is not None and target.stdout.readline()
        attach = session.probes.add

        def exit_then(*args: Any) -> None:
            if when == "after":
                attach(*args)
            target.kill()
            os.waitid(os.P_PID, target.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
            if when == "before":
                attach(*args)

        session.probes.add = exit_then  # type: ignore[method-assign]
        # GIVEN a target that exits WHEN Session.add() attaches to it
        # THEN add() says it is gone, and nothing stays attached or tracked
        with pytest.raises(TargetGone, match=f"pid {target.pid} exited while its probes"):
            session.add(target.pid)
        assert session.targets == {} and session.probes.pids == []
        assert session.probes.target_state(target.pid) is None and not session.active
    finally:
        target.kill()
        target.wait()
        session.close()


# ---------------------------------------------------------------------------- load


def _tasks(pid: int) -> set:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def _final(points: List[MetricRecord]) -> Dict[Any, MetricRecord]:
    """The last data point of each (metric, attributes): cumulative totals."""
    out: Dict[Any, MetricRecord] = {}
    for p in sorted(points, key=lambda p: p.time_ns):
        out[(p.name, tuple(sorted(p.attributes.items())))] = p
    return out


@pytest.mark.ebpf
def test_1000_short_lived_threads(apps: List[App]) -> None:
    with OtlpReceiver() as receiver:
        # (the all set: every thread's acquisitions are counted, waited or not)
        app = _start(apps, receiver.endpoint, receiver.endpoint, OTEL_PYTHON_GIL_PROBES="all")
        pid, sidecar = app.proc.pid, app.find_sidecar()
        # GIVEN a traced app WHEN 1000 threads start, make a span each and end
        app.send("churn 1000")
        assert app.reply(120)["churned"] == 1000
        # THEN its context table holds no exited thread as live, none went unplaced
        app.send("table")
        table = app.reply()
        assert set(table["live_slots"]) <= set(table["live_threads"])
        assert (table["unplaced"], table["errors"]) == (0, 0)
        # AND the kernel's thread map keeps only live threads of the app (the
        # sidecar reaps each exited one), with none untracked and nothing lost
        maps = SidecarMaps(sidecar)
        try:
            deadline = time.monotonic() + 30
            while not set(maps.threads(pid)) <= _tasks(pid):
                assert time.monotonic() < deadline, (set(maps.threads(pid)) - _tasks(pid))
                time.sleep(0.1)
            state = maps.target(pid)
            assert (state.untracked, state.lost) == (0, 0)
        finally:
            maps.close()
        # AND the sidecar still traces the app: new waits arrive as spans
        app.send("burn 2 1")
        burned = app.reply()
        made = app.finish()["exit"]
        assert made == 1000 + sum(burned["burned"].values()) and _app_spans(receiver) == made
        assert app.wait_for_sidecar_exit()
        spans = receiver.spans()
        by_id = {s.span_id: s for s in spans}
        assert {by_id[s.parent_span_id].name for s in spans
                if s.name == names.GIL_WAIT.name and s.parent_span_id in by_id} >= \
            set(burned["burned"])
        # AND all 1000 were traced, under bounded labels: past the first names, as "other"
        acquired = {dict(k[1])[names.LABEL_THREAD]: p.value for k, p in
                    _final(receiver.metrics()).items() if k[0] == names.ACQUISITIONS.name}
        assert len(acquired) <= 21 and acquired[names.OTHER_THREADS] >= 1000 - 20
        _no_traceback(app)
        assert app.app_lines() == []


# ---------------------------------------------------------------------------- loss

THRESHOLD_NS = 1 << 20  # a histogram bucket's lower bound (buckets.bucket_of), ~1.05 ms


@pytest.mark.ebpf
def test_tiny_ring_buffer_overflow_is_counted_exactly(apps: List[App]) -> None:
    with OtlpReceiver() as receiver:
        # GIVEN an app traced through a one-page ring buffer (4 events), the wait
        # threshold on a bucket boundary of the kernel's per-thread histograms (so
        # they count exactly the waits that became events), and no hold events
        app = _start(apps, receiver.endpoint, None, OTEL_PYTHON_GIL_RINGBUF_PAGES="1",
                     OTEL_PYTHON_GIL_WAIT_THRESHOLD_MS=str(THRESHOLD_NS / 1e6),
                     OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS="100000")
        pid, sidecar = app.proc.pid, app.find_sidecar()
        # WHEN its threads contend while the sidecar does not read (SIGSTOP): the
        # ring buffer overflows; then the sidecar reads again, and the app exits
        os.kill(sidecar, signal.SIGSTOP)
        app.send("park 4 1.5")
        burned = app.reply()
        os.kill(sidecar, signal.SIGCONT)
        time.sleep(0.5)
        os.kill(sidecar, signal.SIGSTOP)  # so the kernel's entries outlive the app
        made = app.finish()["exit"]
        maps = SidecarMaps(sidecar)
        try:
            first = buckets.bucket_of(THRESHOLD_NS)
            assert buckets.bucket_bounds(first)[0] == THRESHOLD_NS
            produced = sum(sum(st.wait_hist[first:]) for st in maps.threads(pid).values())
            lost = maps.target(pid).lost
        finally:
            maps.close()
        os.kill(sidecar, signal.SIGCONT)
        assert app.wait_for_sidecar_exit()
        # THEN every wait event the kernel produced was either received by the
        # sidecar (each one ends as a span exported, dropped or skipped, by
        # reason) or counted lost (its lost-events counter, which says exactly
        # what the kernel counted). (The wait-duration histogram is the
        # kernel's own, every wait, so it no longer tells what was received.)
        final = _final(receiver.metrics())
        ours = [p for (name, _), p in final.items() if p.attributes.get(names.LABEL_PID) == pid]
        spans = (names.SPANS_EXPORTED.name, names.SPANS_DROPPED.name, names.SPANS_SKIPPED.name)
        received = sum(p.value for p in ours if p.name in spans)
        (reported,) = [p.value for p in ours if p.name == names.LOST_EVENTS.name]
        assert lost > 0 and received > 0
        assert (reported, received + lost) == (lost, produced)
        assert not [p for p in final.values() if p.name == names.LOST_EVENTS.name
                    and p.attributes.get(names.LABEL_SERVICE) == "otel-gil-sidecar"]
        # AND the app noticed nothing
        assert made == sum(burned["burned"].values())
        _no_traceback(app)
        assert app.app_lines() == []
