"""`otel-gil demo`: run examples/demo_app.py under otel-gil, load it with real HTTP
requests, and show which requests waited for the GIL, and behind whom.

With no OTLP endpoint configured, an embedded OTLP/gRPC receiver on loopback
collects the app's spans and its sidecar's (the spawned sidecar inherits the
app's environment, OTEL_EXPORTER_OTLP_* included), and report.summarize()
turns them into the result (out/demo.json) and otel_gil.views into an HTML view
beside it (out/demo.html: timeline and flame graph of who held the GIL). With
OTEL_EXPORTER_OTLP_ENDPOINT set, everything goes there.
The load generator (also `otel-gil demo --url`, which the compose file's
loadgen runs) is otel_gil/dev/load.py; the result, otel_gil/dev/report.py.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Dict, Optional, Sequence, Tuple

import otel_gil
from otel_gil import views
from otel_gil.dev.load import LoadStats, load, say
from otel_gil.dev.report import render, summarize
from otel_gil.errors import OtelGilError
from otel_gil.target import procfs
from otel_gil.trust import printable_text

APP = Path("examples") / "demo_app.py"


# ------------------------------------------------------------------- the demo app


def find_app() -> Path:
    """examples/demo_app.py of the repository this package runs from (an
    editable install), else of the current directory (the demo image)."""
    for root in (Path(otel_gil.__file__).resolve().parent.parent, Path.cwd()):
        if (root / APP).is_file():
            return root / APP
    raise OtelGilError(f"cannot find {APP}", "run from the otel-gil repository root")


class DemoApp:
    """examples/demo_app.py as a child process, and the sidecar it spawns."""

    def __init__(self, env: Dict[str, str]) -> None:
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(find_app()), "--host", "127.0.0.1", "--port", "0"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True)
        self.sidecar: Optional[int] = None

    def wait_ready(self, timeout: float) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while sel.select(max(0.0, deadline - time.monotonic())):
                line = self.proc.stdout.readline()
                if not line:
                    raise OtelGilError(f"the demo app exited ({self.proc.wait()}): "
                                       f"{self.last_error()}", "run examples/demo_app.py "
                                       "yourself to see its output")
                if line.startswith("{") and json.loads(line).get("ready"):
                    self.sidecar = _child_of(self.proc.pid)
                    return dict(json.loads(line))
        raise OtelGilError(f"the demo app was not ready after {timeout:.0f} s",
                           "see `otel-gil doctor`")

    def last_error(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def stop(self, timeout: float = 15.0) -> str:
        """SIGTERM the app (it flushes its spans), then wait for its sidecar,
        which flushes and exits once the app is gone. Returns their stderr's
        last line (the sidecar inherits the app's stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + timeout
        while self.sidecar and not procfs.exited(self.sidecar) and time.monotonic() < deadline:
            time.sleep(0.05)
        last = self.last_error()
        self._stderr.close()
        return last


def _child_of(pid: int) -> Optional[int]:
    """The app's one child (the spawned sidecar)."""
    children = procfs.children(pid)
    return children[0] if len(children) == 1 else None


# --------------------------------------------------------------------- the run


def endpoint_configured() -> Optional[str]:
    env = os.environ
    return env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def app_env(receiver_endpoint: Optional[str], probes: str = "contended") -> Dict[str, str]:
    """The app's environment; with the embedded receiver, pointed at it, with a
    spawned sidecar (not a node-wide one, whose spans would go elsewhere),
    running the given probe set."""
    env = dict(os.environ)
    env["OTEL_PYTHON_GIL_PROBES"] = probes
    # /cpu holds last one switch interval (5 ms) before a waiter forces a switch:
    # a stack threshold below it, so that the slowest requests name the holder's
    # Python line and native function (otel_gil/stacks/store.py).
    env.setdefault("OTEL_PYTHON_GIL_STACK_THRESHOLD_MS", "2")
    # and a hold threshold below it too: those holds are the demo's story, as
    # gil.hold spans and in the hold-duration histogram (the default 50 ms
    # would keep only a holder preempted for that long)
    env.setdefault("OTEL_PYTHON_GIL_HOLD_THRESHOLD_MS", "4")
    if receiver_endpoint is not None:
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver_endpoint,
                   OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_INSECURE="true",
                   OTEL_PYTHON_GIL_MODE="spawn")
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "500")
        env.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "2000")
    return env


def run_app_under_load(env: Dict[str, str], duration: float) -> Tuple[LoadStats, str, bool]:
    """(load statistics, the app's and sidecar's last line on stderr, whether the
    sidecar was still running at the end of the load)"""
    say("starting examples/demo_app.py under otel-gil (compiling and attaching the probes)")
    app = DemoApp(env)
    try:
        ready = app.wait_ready(60)
        if not ready.get("traced"):
            raise OtelGilError(f"GIL tracing did not start in the demo app: {ready.get('status')}",
                               "run `otel-gil doctor` to see why")
        say(f"tracing live: demo app pid {ready['pid']} on port {ready['port']}, "
            f"sidecar pid {app.sidecar or '?'}")
        stats = load(f"http://127.0.0.1:{ready['port']}", duration)
        survived = app.sidecar is None or not procfs.exited(app.sidecar)
        say("collecting: stopping the app; waiting for its sidecar to flush the GIL spans")
    finally:
        last_words = app.stop()
    return stats, last_words, survived


def run(duration: float, output: str, slowest: int = 10, probes: str = "contended") -> int:
    """The whole demo: app, load, result on stdout and in `output` (JSON)."""
    endpoint = endpoint_configured()
    if endpoint:
        say(f"OTEL_EXPORTER_OTLP_ENDPOINT is set: the app and its sidecar export to {endpoint}")
        stats, last_words, survived = run_app_under_load(app_env(None, probes), duration)
        print(f"Sent {stats.line()}. The spans (request spans with gil.wait children) "
              f"and the sidecar's metrics went to {endpoint}.")
        _check(survived, True, last_words)
        return 0
    from otel_gil.dev.receiver import OtlpReceiver  # noqa: PLC0415 - grpc only when needed

    with OtlpReceiver() as receiver:
        say(f"no OTEL_EXPORTER_OTLP_ENDPOINT: collecting on an embedded receiver "
            f"at {receiver.endpoint}")
        stats, last_words, survived = run_app_under_load(app_env(receiver.endpoint, probes),
                                                         duration)
        spans = receiver.spans()
        result = summarize(spans, receiver.metrics(), stats, slowest)
    print(printable_text(render(result)))  # span names come from a receiver anyone can send to
    _write(output, result)
    page = _write_view(output, spans)
    print(f"\nMachine-readable result: {output}")
    print(f"Timeline and flame graph of who held the GIL (open in a browser): {page}")
    _check(survived, bool(result["gil_spans"]["wait"]), last_words)
    return 0


def _check(survived: bool, got_waits: bool, last_words: str) -> None:
    """After the result is shown: a sidecar that died during the load, or no
    gil.wait span at all (the app is built to contend), means tracing broke."""
    if not survived:
        raise OtelGilError(f"the sidecar exited during the load; the app and its sidecar "
                           f"said last: {last_words}", "the result above is incomplete")
    if not got_waits:
        raise OtelGilError(f"no gil.wait span arrived; the app and its sidecar said last: "
                           f"{last_words}", "run `otel-gil doctor`")


def _write_view(output: str, spans: Sequence[Any]) -> str:
    """The HTML view (otel_gil/views) of the GIL spans, beside the JSON result."""
    page = str(Path(output).with_suffix(".html"))
    if page == output:  # --output x.html: keep the JSON, put the view beside it
        page = output + ".view.html"
    rec = views.from_spans(spans, "GIL waits in the demo app's requests")
    try:
        views.write(rec, {"html": page})
    except OSError as exc:
        raise OtelGilError(f"cannot write {page}: {exc.strerror}",
                           "choose a writable --output path") from None
    return page


def _write(path: str, result: Dict[str, Any]) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise OtelGilError(f"cannot write {path}: {exc.strerror}",
                           "choose a writable --output path") from None
