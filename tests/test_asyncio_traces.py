"""GIL waits on an event loop's thread, parented to the task that was really
running: issue 12's scenario (examples/asyncio_tasks.py) on real interpreters,
with asyncio's loop and uvloop, traced by a real sidecar, spans received at the
real OTLP receiver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from app_site import app_paths
from otlp_receiver import OtlpReceiver, SpanRecord
from targets import PythonTarget, all_targets, require, spawn

from otel_gil import names

# The oldest and newest pyenv builds with the loop patches, and 3.14 (eager
# task factory era, in its chroot).
TARGETS = [t for t in all_targets() if t.name in ("pyenv-3.8", "pyenv-3.12", "sid-3.14")]
# A task's window is the program's own clock reads inside it; a step runs a
# little longer (entering the step, leaving it) than its window. A wait strictly
# inside a window, this far from both of its edges, began while that task ran.
EDGE_NS = 200_000


@pytest.fixture()
def sidecar_for(request: Any) -> Iterator[Any]:
    """A connect-mode sidecar whose socket the target can reach (inside a chroot's /tmp)."""
    started: List[Tuple[subprocess.Popen, OtlpReceiver, str]] = []

    def start(target: PythonTarget) -> Tuple[str, OtlpReceiver]:
        base = os.path.join(target.root, "tmp") if target.root else None
        directory = tempfile.mkdtemp(prefix="otel-gil-sock-", dir=base)
        sock = os.path.join(directory, "s.sock")
        receiver = OtlpReceiver()
        receiver.__enter__()
        env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                   OTEL_EXPORTER_OTLP_INSECURE="true")
        # Waits from 0.1 ms: the short ones too, so that a step's chain of waits is seen.
        proc = subprocess.Popen([sys.executable, "-m", "otel_gil", "sidecar", "--listen", sock,
                                 "--prometheus-port", "0", "--wait-threshold-ms", "0.1"],
                                env=env, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        assert "listening" in proc.stderr.readline()
        started.append((proc, receiver, directory))
        seen = "/" + os.path.relpath(sock, target.root) if target.root else sock
        return seen, receiver

    yield start
    for proc, receiver, directory in started:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        receiver.__exit__(None, None, None)
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def run_scenario(target: PythonTarget, sidecar_for: Any, loops: str) -> Tuple[Dict[str, Any],
                                                                                List[SpanRecord]]:
    sock, receiver = sidecar_for(target)
    code = (f"import sys; sys.argv = ['asyncio_tasks', '--loops', '{loops}']; "
            "import asyncio_tasks; asyncio_tasks.main()")
    with app_paths(target) as pythonpath:
        env = {"PYTHONPATH": pythonpath, "OTEL_PYTHON_GIL_MODE": "connect",
               "OTEL_PYTHON_GIL_SOCKET": sock}
        with spawn(target, code, env=env) as child:
            info = child.read_json(timeout=150)
            assert child.popen.wait(timeout=30) == 0, child.stderr()
    assert info["live"] is True, info
    receiver.wait_for_spans(lambda spans: any(s.name == names.GIL_WAIT.name for s in spans),
                            timeout=30)
    time.sleep(1.0)  # the sidecar exports what is left once the app's connection closes
    return info, receiver.spans()


def steps(windows: List[Tuple[str, int, int]]) -> Dict[str, List[Tuple[int, int]]]:
    """task span id -> the intervals that contain each of its steps: from the
    end of the previous window of another task to the start of the next one.
    A step of the task (entering and leaving it included, and any GC pause or
    preemption in them) runs inside such an interval; other tasks' never do."""
    ordered = sorted(windows, key=lambda w: w[1])
    out: Dict[str, List[Tuple[int, int]]] = {}
    for i, (span_id, start, end) in enumerate(ordered):
        before = max((e for s, _, e in ordered[:i] if s != span_id and e <= start), default=0)
        after = min((b for s, b, _ in ordered[i + 1:] if s != span_id and b >= end),
                    default=1 << 63)
        out.setdefault(span_id, []).append((before, after))
    return out


def check_loop(info: Dict[str, Any], waits: List[SpanRecord], loop: str) -> Dict[str, int]:
    """The waits of one phase's loop thread: under its tasks and under its loop span."""
    app = {s["span_id"]: s for s in info["spans"]}
    recorded = info["windows"][loop]
    task_windows = [tuple(w) for w in recorded["tasks"]]
    by_task = steps(task_windows)  # type: ignore[arg-type]
    counts = {"task": 0, "loop": 0, "select": 0}
    for w in waits:
        parent = app[w.parent_span_id]["name"]
        if not parent.startswith(f"{loop}-"):
            continue
        assert w.attributes[names.THREAD_NATIVE_ID.name] == info["loop_tid"], parent
        slack = w.attributes[names.CLOCK_UNCERTAINTY_NS.name]
        if parent == f"{loop}-loop":
            # GIVEN a wait charged to the loop's own code THEN no task was
            # running when it began
            inside = [app[s]["name"] for s, a, b in task_windows
                      if a + EDGE_NS + slack < w.start_ns < b - EDGE_NS - slack]
            assert not inside, f"a wait in {inside[0]}'s window charged to {parent}"
            counts["loop"] += 1
            continue
        # GIVEN a wait charged to a task THEN it began in one of that task's steps
        assert any(a - slack <= w.start_ns <= b + slack for a, b in by_task[w.parent_span_id]), \
            f"{parent}: wait at {w.start_ns} ({(w.end_ns - w.start_ns) / 1e6:.2f} ms) " \
            f"outside all of its steps"
        counts["task"] += 1
    # AND a wait that began in asyncio's select() (the loop's own code) is the loop's
    for a, b in recorded["selects"]:
        for w in waits:
            if a < w.start_ns < b and w.attributes[names.THREAD_NATIVE_ID.name] == \
                    info["loop_tid"] and app[w.parent_span_id]["name"].startswith(f"{loop}-"):
                assert app[w.parent_span_id]["name"] == f"{loop}-loop", \
                    f"a wait in select() charged to {app[w.parent_span_id]['name']}"
                counts["select"] += 1
    return counts


@pytest.mark.ebpf
@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_loop_thread_waits_go_to_the_running_task(target: PythonTarget, sidecar_for: Any) -> None:
    require(target)
    # GIVEN 8 tasks in their own spans on asyncio's loop, then on uvloop's, and
    # a thread holding the GIL in 3 ms C calls, traced by a sidecar
    info, spans = run_scenario(target, sidecar_for, "asyncio,uvloop")
    app_spans = {s["span_id"]: s for s in info["spans"]}
    waits = [s for s in spans if s.name == names.GIL_WAIT.name]
    # THEN every exported wait is under one of the app's spans, and nested in it
    for w in waits:
        parent = app_spans.get(w.parent_span_id)
        assert parent is not None, f"orphan wait {w.span_id}"
        assert w.trace_id == parent["trace_id"]
        slack = w.attributes[names.CLOCK_UNCERTAINTY_NS.name]
        assert parent["start"] - slack <= w.start_ns < w.end_ns <= parent["end"] + slack
        # AND the holder's waits are the holder's, the loop's never are
        on_holder = w.attributes[names.THREAD_NATIVE_ID.name] == info["holder_tid"]
        assert on_holder == (parent["name"] == "holder"), (parent["name"], on_holder, w.attributes)
    # AND each loop's waits went to the task whose step was running, or to the
    # loop itself, and there were enough of both to mean something
    for loop in ("asyncio", "uvloop"):
        counts = check_loop(info, waits, loop)
        tasks = {w.parent_span_id for w in waits
                 if app_spans[w.parent_span_id]["name"].startswith(f"{loop}-task-")}
        assert counts["task"] >= 5 and len(tasks) >= 3 and counts["loop"] >= 3, (loop, counts)
        if loop == "asyncio":
            assert counts["select"] >= 3, counts
