"""The five views from `otel-gil record` on real probes, and the HTML view in
a real browser.

The workload: one thread calls a Python function that calls libc's usleep
(300 ms) through ctypes.PyDLL, which keeps the GIL for the whole call, three
times; two other threads sleep 1 ms in a loop and so wait behind it each time.
`otel-gil record --pid P` with every view option writes the files; each is
checked for what it must show: the holder thread named with the wait it
caused, the three tracks with hold and wait slices and the arrows between them.

Holder stacks are captured (otel_gil/stacks/store.py): the holder's stack is its
thread, hold_in_c's Python frame, and the C call below it down to usleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
from targets import all_targets, require, spawn

from otel_gil import names

HOLDER, WAITERS = "gil-holder", ("gil-waiter-1", "gil-waiter-2")
HOLD_US = 300_000
HOLDS = 3
WORKLOAD = r"""
import ctypes, json, os, sys, threading, time
libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call

def name_os_thread(name):
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME, read by record

def hold_in_c():
    libc.usleep(%(hold_us)d)

def holder():
    name_os_thread("%(holder)s")
    time.sleep(0.2)
    for _ in range(%(holds)d):
        hold_in_c()
        time.sleep(0.05)
    time.sleep(0.3)  # alive past record's once-a-second name refresh

def waiter(name):
    name_os_thread(name)
    deadline = time.monotonic() + 1.9
    while time.monotonic() < deadline:
        time.sleep(0.001)  # lets the GIL go; taking it back waits behind the holder

print(json.dumps({"pid": os.getpid(), "ready": True}), flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=holder)]
threads += [threading.Thread(target=waiter, args=(n,)) for n in %(waiters)r]
for t in threads: t.start()
for t in threads: t.join()
""" % {"hold_us": HOLD_US, "holder": HOLDER, "holds": HOLDS, "waiters": WAITERS}
VIEWS = {"flamegraph": "view.svg", "folded": "view.folded", "speedscope": "view.speedscope.json",
         "timeline": "view.trace.json", "html": "view.html"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: Any) -> Dict[str, Any]:
    target = next(t for t in all_targets() if t.name == "pyenv-3.11")
    require(target)
    out = tmp_path_factory.mktemp("views")
    child = spawn(target, WORKLOAD)
    try:
        pid = child.read_json(timeout=60)["pid"]
        argv = [sys.executable, "-m", "otel_gil", "record", "--pid", str(pid),
                "--duration", "60", "--output", str(out / "record.json")]
        for kind, name in VIEWS.items():
            argv += [f"--{kind}", str(out / name)]
        rec = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert rec.stderr is not None
            assert f"tracing pid {pid}" in rec.stderr.readline()
            child.send("go")  # the threads start once the probes are live
            stdout, stderr = rec.communicate(timeout=120)  # ends when the child exits
        finally:
            if rec.poll() is None:
                rec.kill()
                rec.wait()
    finally:
        child.close()
    assert rec.returncode == 0, stderr
    assert "Traceback" not in stderr
    return {"dir": out, "stdout": stdout, "stderr": stderr,
            "record": json.loads((out / "record.json").read_text())}


def _tids(record: Dict[str, Any]) -> Dict[str, int]:
    return {t["name"]: t["tid"] for t in record["threads"]}


def assert_holder_stack_is_the_c_call(frames: List[str]) -> None:
    """A holder's stack, outermost first: its thread, hold_in_c's Python frame,
    then the C call inside it down to libc's usleep."""
    assert frames[0] == f"thread {HOLDER}", frames
    # labels (folded, the timeline): "hold_in_c (<string>:9)", "usleep [libc.so.6]";
    # speedscope names the function alone (its file and line are fields of the frame)
    python = [i for i, f in enumerate(frames)
              if re.fullmatch(r"hold_in_c( \(<string>:\d+\))?", f)]
    native = [i for i, f in enumerate(frames) if re.fullmatch(r"usleep( \[libc\.so.*\])?", f)]
    assert python and native and python[0] < native[0], frames


@pytest.mark.ebpf
def test_record_prints_top_holders_and_writes_every_view(recorded: Dict[str, Any]) -> None:
    # GIVEN the C-call workload traced by record with every view option
    # THEN the table's top holder is the thread in usleep, and each view was written
    lines = recorded["stdout"].splitlines()
    top = lines.index(next(ln for ln in lines if ln.startswith("Top holders while others")))
    assert f"thread {HOLDER} > " in lines[top + 1], lines[top:]
    assert "hold_in_c (<string>:" in lines[top + 1] and "usleep" in lines[top + 1], lines[top:]
    for kind, name in VIEWS.items():
        assert f"{kind} written to {recorded['dir'] / name}" in recorded["stderr"]
    assert set(_tids(recorded["record"])) >= {HOLDER, *WAITERS}
    assert recorded["record"]["lost_events"] == 0


@pytest.mark.ebpf
def test_folded_and_flame_graph_name_the_holder(recorded: Dict[str, Any]) -> None:
    out = recorded["dir"]
    lines = (out / VIEWS["folded"]).read_text().splitlines()
    weights = {ln.rsplit(" ", 1)[0]: int(ln.rsplit(" ", 1)[1]) for ln in lines}
    # THEN the heaviest stack is the holder's: both waiters waited behind each
    # 300 ms hold for most of it (at least 2 x 3 x 200 ms, generously)
    heaviest = max(weights, key=lambda k: weights[k])
    assert_holder_stack_is_the_c_call(heaviest.split(";"))
    assert weights[heaviest] >= 2 * HOLDS * 200_000
    assert weights[heaviest] >= 0.9 * sum(weights.values())
    # AND the SVG flame graph has that frame, as wide as that share of the whole
    svg = (out / VIEWS["flamegraph"]).read_text()
    assert svg.startswith("<?xml") and "<script" not in svg
    frame = re.search(r'<g class="frame" data-kind="thread"><title>thread '
                      + re.escape(HOLDER) + r'\n[\d,.]+ ms of others\' wait \(([\d.]+)%\)', svg)
    assert frame is not None
    assert float(frame.group(1)) >= 90.0


@pytest.mark.ebpf
def test_speedscope_names_the_holder(recorded: Dict[str, Any]) -> None:
    doc = json.loads((recorded["dir"] / VIEWS["speedscope"]).read_text())
    (profile,) = doc["profiles"]
    assert profile["type"] == "sampled" and profile["unit"] == "microseconds"
    frames = [f["name"] for f in doc["shared"]["frames"]]
    heaviest = profile["samples"][profile["weights"].index(max(profile["weights"]))]
    assert_holder_stack_is_the_c_call([frames[i] for i in heaviest])
    schema = Path("/var/cache/otel-gil/speedscope-1.25.0/file-format-schema.json")
    if schema.exists():  # scripts/test.sh fetches it; test_views.py insists on it in CI
        import jsonschema

        jsonschema.validate(doc, json.loads(schema.read_text()))


@pytest.mark.ebpf
def test_timeline_has_three_tracks_holds_waits_and_flows(recorded: Dict[str, Any]) -> None:
    tl = json.loads((recorded["dir"] / VIEWS["timeline"]).read_text())
    events, origin = tl["traceEvents"], tl["otherData"]["origin_ns"]
    tids = _tids(recorded["record"])
    holder, waiters = tids[HOLDER], {tids[w] for w in WAITERS}
    # THEN the three threads are named tracks
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {holder, *waiters} <= set(tracks)
    assert tracks[holder] == HOLDER
    # AND the holder's track has its three 300 ms holds, with its stack in their args
    slices = [e for e in events if e["ph"] == "X"]
    # (and no other long one: the contended set follows a hold only while
    # another thread waits, so the holder's brief holds after the last usleep,
    # once the waiters are done, do not read as one long hold)
    long_holds = [e for e in slices if e["name"] == names.GIL_HOLD.name and e["tid"] == holder
                  and e["dur"] >= 0.95 * HOLD_US]
    assert len(long_holds) == HOLDS, [(h["ts"], h["dur"]) for h in long_holds]
    assert all(h["dur"] <= 1.2 * HOLD_US for h in long_holds), long_holds
    for h in long_holds:
        # (innermost first in the args)
        assert_holder_stack_is_the_c_call(h["args"][names.VIEW_ARG_STACK.name][::-1])
        assert h["args"][names.VIEW_ARG_CAUSED.name] > 0
    # AND both waiters' tracks have waits, each one a wait of the record, to the ns
    waits = [e for e in slices if e["name"] == names.GIL_WAIT.name]
    assert {e["tid"] for e in waits} >= waiters
    recorded_waits = {(iv["tid"], iv["start_ns"], iv["end_ns"])
                      for iv in recorded["record"]["intervals"] if iv["kind"] == "wait"}
    assert {(e["tid"], round(e["ts"] * 1000) + origin, round((e["ts"] + e["dur"]) * 1000)
             + origin) for e in waits} == recorded_waits
    # AND on each track the slices follow one another
    assert_tracks_do_not_overlap(events)
    # AND arrows go from each long hold to waits on both waiters' tracks
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    for h in long_holds:
        out = [i for i, s in starts.items()
               if s["tid"] == holder and h["ts"] < s["ts"] < h["ts"] + h["dur"]]
        assert {ends[i]["tid"] for i in out} == waiters, h


def assert_tracks_do_not_overlap(events: List[Dict[str, Any]]) -> None:
    """A thread holds or waits, never both: its complete events must nest (the
    Trace Event Format), and these follow one another without overlapping. In
    integer ns, as Perfetto's importer reads them (llround(ts * 1000)): a wait's
    end is the next hold's start to the ns, which float sums may blur by 1e-10 µs."""
    slices = [e for e in events if e["ph"] == "X"]
    for tid in {e["tid"] for e in slices}:
        mine = sorted((round(e["ts"] * 1000), round(e["ts"] * 1000) + round(e["dur"] * 1000))
                      for e in slices if e["tid"] == tid)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(mine, mine[1:])), tid


def _png_size(path: Path) -> tuple:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--window-size=1400,900"]


@pytest.mark.ebpf
def test_html_view_renders_in_headless_chromium(recorded: Dict[str, Any],
                                                tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "no chromium (scripts/test.sh installs Debian's)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    page = recorded["dir"] / VIEWS["html"]
    shot = tmp_path / "view.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    # GIVEN the HTML view WHEN headless Chromium opens it, dumps the DOM its
    # script built, and takes a screenshot
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           f"--screenshot={shot}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # THEN the page logged nothing to the console: no error, no blocked fetch
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []
    # AND the script drew the timeline: the three tracks, hold and wait slices, arrows
    assert 'data-rendered="timeline"' in dom
    labels = re.findall(r'<text class="track-label"[^>]*>([^<]*)</text>', dom)
    assert {HOLDER, *WAITERS} <= set(labels)
    assert len(re.findall(r'class="slice hold"', dom)) >= HOLDS
    assert len(re.findall(r'class="slice wait"', dom)) >= 2 * HOLDS
    assert len(re.findall(r'class="flow"', dom)) >= 2 * HOLDS
    # AND the flame graph's frames are there, the holder's among them
    assert f"<title>thread {HOLDER}\n" in dom
    assert "<title>hold_in_c (&lt;string&gt;:" in dom or "<title>hold_in_c (<string>:" in dom
    assert "<title>usleep [libc.so" in dom
    assert len(re.findall(r'<g class="frame"', dom)) >= 2
    # AND the screenshot is the window's size and not blank
    assert _png_size(shot) == (1400, 900)
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("OTEL_GIL_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


REPO = Path(__file__).resolve().parent.parent
BURNERS = {"burner-0", "burner-1", "burner-2", "burner-3"}


def _folded_threads(path: Path) -> Dict[str, int]:
    """thread name -> µs others waited behind it, from a folded file (the
    thread is every stack's outermost frame)."""
    out: Dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, weight = line.rsplit(" ", 1)
        thread = stack.split(";")[0].removeprefix("thread ")
        out[thread] = out.get(thread, 0) + int(weight)
    return out


@pytest.mark.ebpf
def test_run_writes_views_of_the_program_it_ran(tmp_path: Path) -> None:
    # GIVEN the example app (4 CPU-bound threads and an I/O one) WHEN otel-gil
    # runs it with views
    proc = subprocess.run([sys.executable, "-m", "otel_gil", "run",
                           "--folded", str(tmp_path / "f"), "--timeline", str(tmp_path / "t"),
                           "--", sys.executable, "examples/contention.py", "--seconds", "1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    # THEN the burners are the holders the others waited behind, and each is a track
    held = _folded_threads(tmp_path / "f")
    assert BURNERS <= set(held), held
    assert sum(held[b] for b in BURNERS) >= 0.8 * sum(held.values())
    events = json.loads((tmp_path / "t").read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert BURNERS | {"io"} <= tracks
    assert any(e["ph"] == "s" for e in events)
    assert_tracks_do_not_overlap(events)


@pytest.mark.ebpf
def test_top_writes_views_when_it_ends(tmp_path: Path) -> None:
    app = subprocess.Popen([sys.executable, "examples/contention.py", "--seconds", "30"],
                           cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        pid = json.loads(app.stdout.readline())["pid"]
        # GIVEN the example app running WHEN top watches it for 2 s, with --html
        proc = subprocess.run([sys.executable, "-m", "otel_gil", "top", "--pid", str(pid),
                               "--duration", "2", "--folded", str(tmp_path / "f"),
                               "--html", str(tmp_path / "v.html")],
                              capture_output=True, text=True, timeout=120)
    finally:
        app.kill()
        app.wait()
    # THEN its last table has the top holders, and the views are written
    assert proc.returncode == 0, proc.stderr
    assert "Top holders while others waited" in proc.stdout
    assert BURNERS & set(_folded_threads(tmp_path / "f"))
    assert "burner-" in (tmp_path / "v.html").read_text()
