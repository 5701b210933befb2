"""Holder stacks: what the GIL's holder was running while it held it.

Where each part is taken (bpf/gil.bpf.c capture_stack), always in the
holder's own context, never by the waiter and never in the app:

* as the holder *blocks* holding the GIL (sched_switch, prev_state sleeping):
  a C call that sleeps, reads or waits without Py_BEGIN_ALLOW_THREADS (a
  ctypes.PyDLL call, an extension doing I/O). Taken whatever the hold's length
  so far, since how long it will block is not known yet;
* at a CPU-clock sample (ProbeConfig.stack_sample_hz per CPU) while it holds
  the GIL, once the hold is known to have lasted the stack threshold: a holder
  that computes (a long C loop, or Python code under a long switch interval).

Per hold (thread, switch number): at most one stack at a sample, replaced by
one taken as the thread blocks, then one at each of its first 8 blocks; the
hold names the stack of its longest block (measured at switch-in). An
uncontended hand-off runs none of this: the probes run at context switches
and samples only, never at take_gil or drop_gil, and take nothing unless the
thread holds the GIL.

Each stack has the holder's Python frames (otel_gil/stacks/pyframes.py) and native
frames (otel_gil/stacks/unwind.py), decoded here in the sidecar when the hold or wait
that names it (gil_hold.stack_seq) arrives. A hold event carries its stack; a
wait event, the stacks of the holds it overlapped.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from otel_gil.abi import events
from otel_gil.stacks import pyframes
from otel_gil.stacks.pyframes import CodeReader, PyFrame
from otel_gil.stacks.unwind import NativeFrame, Unwinder

if TYPE_CHECKING:
    from otel_gil.target.process import Target

EVAL_LOOP_PREFIX = "_PyEval_EvalFrame"  # _PyEval_EvalFrameDefault (and .cold), 3.8 to 3.15
RECORDS_KEPT = 256  # raw stacks kept per process until a hold names them
PUSHED_OUT_KEPT = 4096  # seqs of stacks pushed out, remembered to count a late naming
_STACK_SIZE = ctypes.sizeof(events.GilStack)


@dataclass(frozen=True)
class HolderStack:
    """A holder's stack, innermost frame first in each part."""

    python: Tuple[PyFrame, ...]
    native: Tuple[NativeFrame, ...]
    taken: str  # "blocked" (at sched_switch) or "sample" (at a CPU sample)
    native_unwind: str  # "cfi", "frame pointers" or "none"

    @property
    def top_python(self) -> Optional[PyFrame]:
        return self.python[0] if self.python else None

    @property
    def top_native(self) -> Optional[NativeFrame]:
        return next((f for f in self.native if f.function != "?"), None)

    def traceback(self) -> str:
        """The Python frames as a traceback prints them (most recent call last),
        then the native frames the holder was in, innermost last."""
        lines = ["Traceback (most recent call last):"]
        for f in reversed(self.python):
            line = f"line {f.line}" if f.line is not None else f"line {f.first_line} (first)"
            lines.append(f'  File "{f.file}", {line}, in {f.function}')
        for n in reversed(self.native):
            lines.append(f"  [native] {n.function} in {os.path.basename(n.object)}")
        return "\n".join(lines)

    def native_call(self) -> Tuple[NativeFrame, ...]:
        """The native frames inside the innermost Python frame: those innermost of
        the innermost evaluation loop (_PyEval_EvalFrame*), i.e. the C call that
        Python frame made; all of them when no loop is among them (a thread
        outside Python, or a walk that stopped early)."""
        for i, n in enumerate(self.native):
            if n.function.startswith(EVAL_LOOP_PREFIX):
                return self.native[:i]
        return self.native

    def frames_json(self) -> List[Dict[str, Any]]:
        """Python and native frames merged, for a record (docs/record-json.md
        `stack`), innermost first: the C call (native_call), then the Python
        frames (the interpreter's own frames between them are left out)."""
        out: List[Dict[str, Any]] = [
            {"kind": "native", "function": n.function, "object": n.object}
            for n in self.native_call() if n.function != "?"]
        out += [{"kind": "python", "function": f.function, "file": f.file, "line": f.line}
                for f in self.python]
        return out


def python_label(f: PyFrame) -> str:
    return f"{f.function} ({f.file}:{f.line if f.line is not None else f.first_line})"


def frame_layout(target: "Target") -> Optional[pyframes.FrameLayout]:
    """Where the target's frames are; None: no Python frames (free-threaded, or
    a version whose layout is not known)."""
    interp = target.interpreter
    if interp.free_threaded:
        return None
    version = interp.version[:2]
    if version >= (3, 13) and interp.runtime_address is not None:
        try:
            with open(f"/proc/{target.pid}/mem", "rb", buffering=0) as mem:
                mem.seek(target.load_bias + interp.runtime_address)
                raw = mem.read(8 + 8 * 160)
        except OSError:
            raw = b""
        if raw[:8] == b"xdebugpy" and len(raw) == 8 + 8 * 160:
            found = pyframes.from_debug_offsets(version, struct.unpack_from("<160Q", raw, 8))
            if found is not None:
                return found
    return pyframes.TABLE.get(version)


def code_type_address(target: "Target") -> Optional[int]:
    """Runtime address of PyCode_Type (exported by every libpython / python)."""
    from otel_gil.errors import TargetError
    from otel_gil.target.elf import ElfObject
    from otel_gil.target.procfs import under_root as proc_path

    try:
        with ElfObject(proc_path(target.pid, target.object_path)) as obj:
            sym = obj.lookup("PyCode_Type")
    except (TargetError, OSError):
        return None
    return None if sym is None else target.load_bias + sym.value


class ProcessStacks:
    """The stacks of one traced process: raw records until named, then decoded."""

    def __init__(self, pid: int, root: str, layout: Optional[pyframes.FrameLayout],
                 code_type: Optional[int]) -> None:
        self.pid = pid
        self.code = (CodeReader(pid, layout, code_type)
                     if layout is not None and code_type is not None else None)
        self.unwinder = Unwinder(pid, root)
        self._raw: "OrderedDict[int, Tuple[events.GilStack, Tuple[int, ...]]]" = OrderedDict()
        self._decoded: "OrderedDict[int, HolderStack]" = OrderedDict()
        # Records pushed out of the window, by seq, until a hold names one (then
        # it counts as evicted: wanted, but gone). Most are never named: a
        # stack is taken at every block of a hold, short holds included.
        self._pushed_out: "OrderedDict[int, None]" = OrderedDict()
        self.evicted = 0  # stacks a hold named after newer ones had replaced them
        self.undecodable = 0  # stacks whose decoding failed

    def close(self) -> None:
        if self.code is not None:
            self.code.close()

    def add(self, rec: events.GilStack, fp_stack: Tuple[int, ...]) -> None:
        self._raw[rec.seq] = (rec, fp_stack)
        self._decoded.pop(rec.seq, None)
        while len(self._raw) > RECORDS_KEPT:
            self._pushed_out[self._raw.popitem(last=False)[0]] = None
            if len(self._pushed_out) > PUSHED_OUT_KEPT:
                self._pushed_out.popitem(last=False)

    def get(self, seq: int, tid: int) -> Optional[HolderStack]:
        """The stack named seq, if it is the thread's (a hold names the stack
        of its longest block; a mismatch is a stale or torn name: none)."""
        if not seq:
            return None
        hit = self._decoded.get(seq)
        raw = self._raw.get(seq)
        if raw is None:
            if self._pushed_out.pop(seq, 0) is None:  # named once it was gone
                self.evicted += 1
            return None
        if raw[0].tid != tid:
            return None
        if hit is None:
            try:
                hit = self._decode(*raw)
            except Exception:  # noqa: BLE001 - the target's data: never the sidecar's end
                self.undecodable += 1
                return None
            self._decoded[seq] = hit
            while len(self._decoded) > RECORDS_KEPT:
                self._decoded.popitem(last=False)
        return hit

    def _decode(self, rec: events.GilStack, fp_stack: Tuple[int, ...]) -> HolderStack:
        n = min(rec.nframes, events.GIL_MAX_PYFRAMES)
        py: List[PyFrame] = []
        if self.code is not None:
            py = self.code.frames([(f.code, f.instr) for f in rec.frames[:n]])
        stack = bytes(rec.stack)[: min(rec.stack_len, len(rec.stack))]
        pcs = self.unwinder.unwind(rec.ip, rec.sp, rec.bp, stack) if rec.ip else []
        how = "cfi"
        if not pcs and fp_stack:
            # No registers or stack copy: the kernel's frame-pointer walk, exact
            # only where the objects keep frame pointers. Where the CFI walk
            # itself stops at once, its one frame is kept rather than that
            # walk's frames, which without frame pointers are garbage.
            pcs, how = list(fp_stack), "frame pointers"
        if not pcs:
            how = "none"
        native = tuple(self.unwinder.frame(pc, i > 0) for i, pc in enumerate(pcs))
        return HolderStack(tuple(py), native, "blocked" if rec.blocked else "sample", how)


class StackStore:
    """Per-process stacks, fed from the ring buffer; attaches them to intervals."""

    def __init__(self, fp_walk: Callable[[int], Tuple[int, ...]]) -> None:
        self._procs: Dict[int, ProcessStacks] = {}
        self._fp_walk = fp_walk  # BPF_STACK_TRACE id -> addresses (and frees it)
        self.undecodable = 0
        self.unknown_process = 0
        self._ring_full: Dict[int, int] = {}  # pid -> the kernel's stacks_lost, last read
        self._gone: Dict[str, int] = {}  # the losses of processes no longer traced

    def add_target(self, target: "Target") -> None:
        self.remove(target.pid)
        self._procs[target.pid] = ProcessStacks(
            target.pid, target.root, frame_layout(target), code_type_address(target))

    def counts(self, pid: int, state: events.TargetState) -> Dict[str, int]:
        """What became of the process's stacks, for the record (nothing lost silently)."""
        proc = self._procs.get(pid)
        return {
            "taken": state.stacks_taken,
            "lost": state.stacks_lost,  # ring buffer full
            "evicted": proc.evicted if proc else 0,  # named after they were replaced
            "undecodable": proc.undecodable if proc else 0,
            "python_frames_unreadable": proc.code.unreadable if proc and proc.code else 0,
        }

    def losses(self, states: Dict[int, events.TargetState]) -> Dict[str, int]:
        """Every stack lost so far, by reason (otel_gil.stacks.lost), processes
        gone included; states: the kernel's state of the traced ones."""
        for pid, state in states.items():
            self._ring_full[pid] = int(state.stacks_lost)
        out = {"ring_full": sum(self._ring_full.values()) + self._gone.get("ring_full", 0),
               "evicted": sum(p.evicted for p in self._procs.values()),
               "undecodable": self.undecodable + sum(p.undecodable for p in self._procs.values()),
               "unknown_process": self.unknown_process}
        for reason in ("evicted", "undecodable"):
            out[reason] += self._gone.get(reason, 0)
        return out

    def remove(self, pid: int, state: Optional[events.TargetState] = None) -> None:
        """Forget a process's stacks, keeping its losses (state: its kernel
        state's last copy, for the stacks the kernel could not send)."""
        if state is not None:
            self._ring_full[pid] = int(state.stacks_lost)
        proc = self._procs.pop(pid, None)
        if proc is not None:
            self._gone["evicted"] = self._gone.get("evicted", 0) + proc.evicted
            self._gone["undecodable"] = self._gone.get("undecodable", 0) + proc.undecodable
            proc.close()
        lost = self._ring_full.pop(pid, 0)
        if lost:
            self._gone["ring_full"] = self._gone.get("ring_full", 0) + lost

    def on_record(self, data: bytes) -> None:
        if len(data) < _STACK_SIZE:
            self.undecodable += 1
            return
        rec = events.GilStack.from_buffer_copy(data[:_STACK_SIZE])
        fp = self._fp_walk(rec.user_stack_id) if rec.user_stack_id >= 0 else ()
        proc = self._procs.get(rec.pid)
        if proc is None:
            self.unknown_process += 1
            return
        proc.add(rec, fp)

    def attach(self, iv: events.Interval) -> events.Interval:
        """The interval with the stacks its seqs name (hold: its own; wait: per hold)."""
        proc = self._procs.get(iv.pid)
        if proc is None or not any(iv.stack_seqs):
            return iv
        if iv.kind == "hold":
            return iv._replace(stacks=(proc.get(iv.stack_seqs[0], iv.tid),))
        return iv._replace(stacks=tuple(
            proc.get(seq, h.tid) for seq, h in zip(iv.stack_seqs, iv.holds)))


def stack_of_hold(iv: events.Interval, index: int) -> Optional[HolderStack]:
    """The stack of a wait's index-th hold, or of a hold event (index 0)."""
    if index < len(iv.stacks):
        found = iv.stacks[index]
        return found if isinstance(found, HolderStack) else None
    return None


def main_holder_stack(iv: events.Interval) -> Optional[HolderStack]:
    """A wait's stack for its span: that of the hold that overlapped it longest
    (and had one); a hold's own stack."""
    if iv.kind == "hold":
        return stack_of_hold(iv, 0)
    best: Tuple[int, Optional[HolderStack]] = (0, None)
    for i, h in enumerate(iv.holds):
        if h.tid == iv.tid:
            continue
        overlap = min(h.end_ns, iv.end_ns) - max(h.start_ns, iv.start_ns)
        found = stack_of_hold(iv, i)
        if found is not None and overlap > best[0]:
            best = (overlap, found)
    return best[1]


def record_stacks(out: Dict[str, Any], iv: events.Interval) -> None:
    """Put the interval's stacks in its record entry (docs/record-json.md
    `stack`): on a hold interval, and on each entry of a wait's holds[]."""
    if iv.kind == "hold":
        found = stack_of_hold(iv, 0)
        if found is not None:
            out["stack"] = found.frames_json()
        return
    for i, entry in enumerate(out.get("holds") or []):
        found = stack_of_hold(iv, i)
        if found is not None and isinstance(entry, dict):
            entry["stack"] = found.frames_json()
