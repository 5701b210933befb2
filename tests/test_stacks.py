"""Holder stacks: the holder's Python and native frames on the holds and the
waits it caused, taken by the real probes in real interpreters (otel_gil/stacks/store.py).

The C-call case: a thread calls hold_in_c(), which blocks briefly in libc's
poll(2 ms), then in usleep(300 ms), through ctypes.PyDLL (which keeps the GIL)
while other threads wait: the hold is named by its longest block. The
pure-Python case: a long loop under a long switch interval."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from otlp_receiver import OtlpReceiver, SpanRecord
from targets import PythonTarget, all_targets, require, spawn

from otel_gil import names, views
from otel_gil.abi.events import Interval
from otel_gil.cli import report
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.stacks import pyframes
from otel_gil.stacks.store import HolderStack, main_holder_stack

ROOT = Path(__file__).parent.parent
APP = ROOT / "examples" / "c_holder_app.py"
BY_NAME = {t.name: t for t in all_targets()}

C_HOLDER = """\
import ctypes, ctypes.util, json, sys, threading, time
libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6")
sys.setswitchinterval(0.02)  # poll's 2 ms and usleep are one hold

def hold_in_c(us):
    libc.poll(None, 0, 2)  # a brief block first, in the same hold
    libc.usleep(us)

def spin(stop):
    while not stop.is_set():
        sum(range(200))

def holder(rounds):
    for _ in range(rounds):
        hold_in_c(300_000)
        time.sleep(0.05)

print(json.dumps({"ready": True}), flush=True)
rounds = int(sys.stdin.readline())
stop = threading.Event()
waiters = [threading.Thread(target=spin, args=(stop,)) for _ in range(2)]
for w in waiters:
    w.start()
h = threading.Thread(target=holder, args=(rounds,))
h.start()
h.join()
stop.set()
for w in waiters:
    w.join()
print(json.dumps({"done": True}), flush=True)
sys.stdin.readline()
"""
USLEEP_LINE = 7  # `libc.usleep(us)` in C_HOLDER

PY_HOLDER = """\
import json, sys, threading, time
sys.setswitchinterval(5.0)  # the loop below keeps the GIL: no forced switch

def long_loop():
    n = 0
    for i in range(40_000_000):
        n += i
    return n

def waiter():
    time.sleep(0.05)
    sum(range(10))

print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
w = threading.Thread(target=waiter)
w.start()
long_loop()
w.join()
print(json.dumps({"done": True}), flush=True)
sys.stdin.readline()
"""
LOOP_LINES = (5, 6, 7)  # long_loop's body in PY_HOLDER


@dataclass
class Traced:
    intervals: List[Interval]
    doc: Dict[str, Any]  # the record (report.to_json)
    stacks_taken: int  # struct target's count, at the end


def _record(target: PythonTarget, code: str, send: str,
            config: Optional[ProbeConfig] = None) -> Traced:
    """Trace the child until it says done."""
    child = spawn(target, code)
    try:
        child.read_json(timeout=60)
        session = Session(config or ProbeConfig())
        try:
            session.add(child.host_pid)
            child.send(send)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                session.step(50)
                try:
                    if child.read_json(timeout=0.01).get("done"):
                        break
                except TimeoutError:
                    continue
            for _ in range(5):
                session.step(50)
            state = session.probes.target_state(child.host_pid)
            return Traced(list(session.intervals), report.to_json(session),
                          state.stacks_taken if state is not None else -1)
        finally:
            session.close()
    finally:
        child.close()


def _python(stack: HolderStack) -> List[Any]:
    return [(f.function, f.file, f.line) for f in stack.python]


def _native(stack: HolderStack) -> List[str]:
    return [n.function for n in stack.native]


def _longest_overlap_ns(wait: Interval) -> int:
    """The longest time one other thread's hold overlapped the wait."""
    return max((min(h.end_ns, wait.end_ns) - max(h.start_ns, wait.start_ns)
                for h in wait.holds if h.tid != wait.tid), default=0)


def _c_call(stack: Optional[HolderStack]) -> bool:
    return (stack is not None and ("hold_in_c", "<string>", USLEEP_LINE) in _python(stack)
            and "usleep" in _native(stack))


# Every kind of interpreter with the default (contended) set; the all set, whose
# stacks come from the same capture, on an LTO build with a debug file, a
# chrooted 3.15 and a shared pyenv build (a third of the suite's time saved).
C_CALL_CASES = [(name, "contended") for name in (
    "debian-3.11", "sid-3.15", "stripped-3.11", "stripped-3.15", "pyenv-3.8", "pyenv-3.10",
    "pyenv-3.12", "pyenv-3.13", "sid-3.14")] + [
    (name, "all") for name in ("debian-3.11", "sid-3.15", "pyenv-3.12")]


@pytest.mark.ebpf
@pytest.mark.parametrize("name,probes", C_CALL_CASES)
def test_c_call_holder_stack_on_holds_waits_and_views(name: str, probes: str) -> None:
    target = BY_NAME[name]
    require(target)
    # GIVEN a thread in hold_in_c -> usleep(300 ms) through ctypes.PyDLL, and
    # two threads that want the GIL meanwhile (debian-3.11: LTO, symbols in a
    # debug file; sid-3.14/3.15: LTO, no frame pointers, in a chroot and PID
    # namespace; stripped-3.11/3.15: no symbols at all in the interpreter)
    # WHEN it is traced through three such holds
    session = _record(target, C_HOLDER, "3", ProbeConfig(probes=probes))
    long_holds = [iv for iv in session.intervals
                  if iv.kind == "hold" and iv.duration_ns >= 250_000_000]
    long_waits = [iv for iv in session.intervals
                  if iv.kind == "wait" and iv.duration_ns >= 250_000_000]
    assert len(long_holds) >= 2 and long_waits, session.intervals
    # THEN each 300 ms hold carries the holder's stack: hold_in_c at the usleep
    # line, and usleep below it, unwound through ffi and _ctypes
    for iv in long_holds:
        stack = main_holder_stack(iv)
        assert _c_call(stack), stack and stack.traceback()
        assert stack is not None and stack.taken == "blocked"
        assert stack.native_unwind == "cfi"
        if target.symbols != "none":  # stripped-3.15: no symbol for _ctypes' internals
            assert "_ctypes_callproc" in _native(stack)
    # AND so does every wait spent behind one (whose longest overlap is such a
    # hold: on a loaded host a waiter may also be kept out by the others)
    behind = [iv for iv in long_waits if _longest_overlap_ns(iv) >= 250_000_000]
    assert behind, long_waits
    for iv in behind:
        stack = main_holder_stack(iv)
        assert _c_call(stack), (iv, stack and stack.traceback())
    # AND the views, from the record, name both Python function and C function
    rec = views.from_record(session.doc)
    folded = views.render("folded", rec)
    line = max(folded.splitlines(), key=lambda x: int(x.rsplit(" ", 1)[1]))
    assert f"hold_in_c (<string>:{USLEEP_LINE})" in line and "usleep [libc.so.6]" in line, folded
    svg = views.render("flamegraph", rec)
    assert "hold_in_c" in svg and "usleep" in svg
    table = report.holders_table(rec)
    assert "usleep" in table.splitlines()[1], table


@pytest.mark.ebpf
@pytest.mark.parametrize("name", ["debian-3.11", "sid-3.15"])
def test_pure_python_holder_names_its_function_and_line(name: str) -> None:
    target = BY_NAME[name]
    require(target)
    # GIVEN a loop in long_loop() that keeps the GIL for about a second (a 5 s
    # switch interval), and a thread that wants the GIL meanwhile
    session = _record(target, PY_HOLDER, "go")
    # WHEN that hold ends THEN it carries long_loop at a line of its loop,
    # taken by a CPU sample (the holder never blocks)
    holds = [iv for iv in session.intervals if iv.kind == "hold"]
    stacks = [main_holder_stack(iv) for iv in holds]
    found = [s for s in stacks if s is not None and s.top_python is not None
             and s.top_python.function == "long_loop"]
    assert found, [s and s.traceback() for s in stacks]
    top = found[0].top_python
    assert top is not None and top.file == "<string>" and top.line in LOOP_LINES
    assert found[0].taken == "sample"


UNCONTENDED = """\
import json, sys, time
print(json.dumps({"ready": True}), flush=True)
n = int(sys.stdin.readline())
for _ in range(n):
    time.sleep(0)  # drops and re-takes the GIL
print(json.dumps({"done": True}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.ebpf
@pytest.mark.parametrize("probes", ["contended", "all"])
def test_uncontended_hand_offs_take_no_stack(probes: str) -> None:
    target = BY_NAME["debian-3.11"]
    require(target)
    # GIVEN one thread alone that drops and re-takes the GIL 20 000 times
    # WHEN traced with holder stacks on (a 1 ms stack threshold)
    traced = _record(target, UNCONTENDED, "20000",
                     ProbeConfig(probes=probes, stack_threshold_ns=1_000_000))
    # THEN (almost) no stack was taken: capture runs only for a thread that
    # blocks holding the GIL, or at a CPU sample in a hold past the threshold;
    # never per hand-off. (A few: start-up and exit hold the GIL for
    # milliseconds, and a sample may land there.)
    assert traced.stacks_taken < 5, traced.stacks_taken


# ------------------------------------------------------------------ spans


def _attrs_stack(span: SpanRecord) -> Dict[str, Any]:
    return {k: v for k, v in span.attributes.items()
            if k.startswith(("code.", "otel_gil.holder.stack."))}


@pytest.mark.ebpf
def test_c_call_stack_on_spans_at_the_otlp_receiver() -> None:
    # GIVEN the example app: hold_in_c -> usleep(300 ms) under PyDLL in a
    # "holder" span, while "request" spans wait, exporting to a real receiver
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "200",
               "OTEL_PYTHON_GIL_PROMETHEUS_PORT": "0"}
        proc = subprocess.run([sys.executable, str(APP)], env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        end = json.loads(proc.stdout.splitlines()[-1])
        receiver.wait_for_spans(
            lambda spans: any(s.name == names.GIL_HOLD.name for s in spans), timeout=30)
        time.sleep(1.0)
        spans = receiver.spans()
    holds = [s for s in spans if s.name == names.GIL_HOLD.name
             and s.attributes[names.HOLD_NS.name] >= 250_000_000]
    waits = [s for s in spans if s.name == names.GIL_WAIT.name
             and s.attributes[names.WAIT_NS.name] >= 250_000_000]
    assert holds and waits, [(s.name, s.attributes) for s in spans if s.name.startswith("gil")]
    # THEN the gil.hold spans carry hold_in_c (file, line) and usleep
    for s in holds:
        a = s.attributes
        assert a[names.CODE_FUNCTION_NAME.name] == "hold_in_c", _attrs_stack(s)
        assert a[names.CODE_FILE_PATH.name] == end["file"]
        assert a[names.CODE_LINE_NUMBER.name] == end["usleep_line"]
        text = a[names.CODE_STACKTRACE.name]
        assert f'File "{end["file"]}", line {end["usleep_line"]}, in hold_in_c' in text, text
        assert "usleep" in a[names.STACK_NATIVE_FUNCTIONS.name]
        assert a[names.STACK_PY_FUNCTIONS.name][0] == "hold_in_c"
    # AND the long waits behind it carry the same stack and a link that names it
    for s in waits:
        a = s.attributes
        assert "in hold_in_c" in a[names.CODE_STACKTRACE.name]
        assert "usleep" in a[names.STACK_NATIVE_FUNCTIONS.name]
        assert names.CODE_FUNCTION_NAME.name not in a  # the waiter is not the holder
    linked = [attrs for s in waits for _t, _s, attrs in s.links
              if names.LINK_PY_FUNCTION.name in attrs]
    assert linked, [s.links for s in waits]
    assert linked[0][names.LINK_PY_FUNCTION.name].startswith("hold_in_c (")
    assert linked[0][names.LINK_NATIVE_FUNCTION.name].split(" ")[0] in (
        "clock_nanosleep", "__clock_nanosleep", "nanosleep", "usleep")


# ------------------------------------------------------------------ pure logic


def _lines_by_unit(code: Any) -> Dict[int, Optional[int]]:
    out: Dict[int, Optional[int]] = {}
    for start, end, line in code.co_lines():
        for off in range(start, end, 2):
            out[off // 2] = line
    return out


def _sample(a: int) -> int:
    b = a + 1
    if b > 3:
        b *= 2
    for i in range(3):
        b += i
    return b


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the 3.11+ location table")
def test_location_table_lines_match_co_lines() -> None:
    # GIVEN a function's code object in this interpreter
    code = _sample.__code__
    # THEN our decoder gives every code unit the line co_lines() gives it
    for unit, line in _lines_by_unit(code).items():
        assert pyframes.line_from_locations(code.co_linetable, code.co_firstlineno, unit) == line


def test_location_table_is_bounded_on_garbage() -> None:
    # GIVEN tables from a hostile process THEN no crash and no endless loop
    for table in (b"", b"\x00" * 64, b"\xff" * 4096, bytes(range(256)) * 8):
        pyframes.line_from_locations(table, 1, 10**6)
        pyframes.line_from_linetable310(table, 1, 10**6)
        pyframes.line_from_lnotab(table, 1, 10**6)


@pytest.mark.parametrize("name,expected", [
    # (current_frame, previous, executable, instr_ptr, co_code_adaptive) from
    # gdb on pyenv 3.13.0; sid's 3.14 and 3.15 as their debug offsets say.
    ("pyenv-3.13", (72, 8, 0, 56, 200)),
    ("sid-3.14", (72, 8, 0, 56, 208)),
    ("sid-3.15", (72, 8, 0, 56, 208)),
])
def test_frame_layout_from_debug_offsets(name: str, expected: tuple[int, ...]) -> None:
    from otel_gil.target.elf import ElfObject
    from otel_gil.target.interpreter import inspect_binary

    target = BY_NAME[name]
    require(target)
    interp = inspect_binary(target.interpreter_elf, target.root or "/")
    assert interp.runtime_address is not None
    with ElfObject(target.interpreter_elf) as obj:
        raw = obj.read(interp.runtime_address, 8 + 8 * 160)
    layout = pyframes.from_debug_offsets(target.version, struct.unpack_from("<160Q", raw, 8))
    assert layout is not None
    assert (layout.off_frame, layout.off_prev, layout.off_code, layout.off_instr,
            layout.co_code_adaptive) == expected
    if target.version == (3, 13):
        assert layout == pyframes.TABLE[(3, 13)]


def test_interval_without_stacks_has_none() -> None:
    iv = Interval("hold", 1, 2, 0, 10, None)
    assert main_holder_stack(iv) is None


def test_stack_losses_are_counted_by_reason_and_survive_the_process() -> None:
    from otel_gil.abi import events
    from otel_gil.stacks.store import RECORDS_KEPT, ProcessStacks, StackStore

    store = StackStore(lambda _id: ())
    # GIVEN a traced process whose kernel could not send 3 stacks, and which
    # took 5 more stacks than are kept
    pid = os.getpid()
    store._procs[pid] = ProcessStacks(pid, "/", None, None)
    state = events.TargetState()
    state.stacks_lost = 3
    for seq in range(1, RECORDS_KEPT + 6):
        rec = events.GilStack()
        rec.seq, rec.pid = seq, pid
        store._procs[pid].add(rec, ())
    # WHEN holds name 4 of the 5 pushed out (one twice), and one still kept:
    # a stack no hold names is not lost (one is taken at every block)
    for seq in (1, 2, 2, 3, 5, RECORDS_KEPT):
        store._procs[pid].get(seq, 0)
    assert store._procs[pid].evicted == 4
    # AND a record of another process, and one too short to decode
    other = events.GilStack()
    other.pid = 1
    store.on_record(bytes(other))
    store.on_record(b"\0" * 8)
    # THEN each loss has its reason
    assert store.losses({pid: state}) == {
        "ring_full": 3, "evicted": 4, "undecodable": 1, "unknown_process": 1}
    # AND once the process is gone (its last state: 4 not sent), they stay counted
    state.stacks_lost = 4
    store.remove(pid, state)
    lost = store.losses({})
    assert lost == {"ring_full": 4, "evicted": 4, "undecodable": 1, "unknown_process": 1}


class _NoSpans:
    def counts(self) -> Dict[Any, int]:
        return {}


def test_stack_losses_are_in_the_loss_line_totals() -> None:
    from otel_gil.sidecar.losses import sidecar_totals
    # GIVEN stack losses WHEN the sidecar sums its losses THEN they are named
    totals = sidecar_totals(_NoSpans(), 0, (0, 0),  # type: ignore[arg-type]
                            {"ring_full": 2, "evicted": 0})
    assert totals["holder stacks lost (ring_full)"] == 2
    assert totals["holder stacks lost (evicted)"] == 0


def test_caller_rules_and_frames_are_parsed_once_per_address(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from otel_gil.stacks import unwind

    # GIVEN libc as this process maps it, and usleep's address in it
    maps = [m for m in unwind.procfs.executable_maps(os.getpid()) if "libc.so" in m.path]
    assert maps, "libc is not mapped"
    info = unwind.object_info(maps[0].path, ("/",))
    assert info is not None
    info._rules.clear()  # the object is shared (per build-id) with earlier tests
    start = next(s for s, _size, name in info._syms if name == "usleep")
    parsed: List[int] = []
    real = unwind.ObjectInfo._parse_rule

    def counting(self: unwind.ObjectInfo, vaddr: int) -> Any:
        parsed.append(vaddr)
        return real(self, vaddr)

    monkeypatch.setattr(unwind.ObjectInfo, "_parse_rule", counting)
    # WHEN the rule at an address is asked for again and again
    rules = [info.caller_rule(start + 4) for _ in range(3)]
    # THEN the CFI is parsed once, and the rule is what a fresh parse gives
    assert parsed == [start + 4] and rules[0] is not None
    assert rules[0] == rules[1] == rules[2] == real(info, start + 4)
    # AND the cache is bounded: past MAX_RULES it starts over
    monkeypatch.setattr(unwind, "MAX_RULES", 2)
    for a in (start + 1, start + 2, start + 3):
        info.caller_rule(a)
    assert len(info._rules) <= 2
    # AND a pc's native frame is symbolised once, the same as uncached
    unwinder = unwind.Unwinder(os.getpid(), "/")
    pcs = [m.start + start - base for m in maps
           for base in [info.vaddr(m.file_offset)]
           if base is not None and base <= start < base + m.end - m.start]
    assert pcs, "usleep is in no executable mapping of libc"
    first, again = unwinder.frame(pcs[0] + 4, False), unwinder.frame(pcs[0] + 4, False)
    assert first is again and first == unwinder._frame(pcs[0] + 4, False)
    assert first.function == "usleep"
