"""Python frames of a GIL holder: where they are (for the probes) and what they say.

The probes (bpf/gil.bpf.c read_pyframes) walk the holder's frame chain in its
own context and send, per frame, the code object's address and the frame's
instruction pointer (3.8-3.10: f_lasti). This module gives them the offsets of
that walk, and turns (code, instr) into function, file and line by reading the
code object from /proc/PID/mem in the sidecar, later.

How exact:

* The chain is read by the holder itself, stopped in the kernel (at a block or
  a CPU sample), so it is the one it runs on. 3.11+ may catch a frame being
  pushed (its fields half written): a code pointer that is not a code object
  (checked against PyCode_Type) is left out.
* Function, file and first line are read when the event reaches the sidecar,
  a few ms later: code objects live as long as their function, so this is the
  same object unless the function was freed and its memory reused (then the
  type check usually fails and the frame is left out).
* The line is the line table's line for the instruction (3.11+ location
  table, 3.10 co_linetable, 3.8/3.9 co_lnotab), as a traceback shows it.

Offsets: x86-64 default (non-debug) builds, from gdb on the pyenv builds
(``print &((PyCodeObject*)0)->co_name`` and so on); 3.13+ from the
interpreter's own ``_Py_DebugOffsets`` (its thread_state, interpreter_frame
and code_object tables), the table below only when those cannot be read.
Free-threaded builds are not read (another object header).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from otel_gil.abi.events import GIL_NO_OFFSET
from otel_gil.errors import OtelGilError
from otel_gil.target import procfs
from otel_gil.trust import printable

MAX_NAME = 256  # characters of a function or file name kept
MAX_LINETABLE = 1 << 16  # bytes of a line table read


@dataclass(frozen=True)
class FrameLayout:
    """Where the frame chain and a code object's fields are (x86-64)."""

    off_frame: int  # PyThreadState: frame / cframe / current_frame
    off_frame2: int  # _PyCFrame.current_frame (3.11, 3.12), else GIL_NO_OFFSET
    off_prev: int
    off_code: int
    off_instr: int
    instr_kind: str  # "lasti_bytes" (3.8, 3.9), "lasti_units" (3.10), "prev_instr", "instr_ptr"
    co_firstlineno: int
    co_filename: int
    co_name: int  # co_qualname where there is one (3.11+)
    co_lines: int  # co_lnotab (3.8, 3.9) / co_linetable
    lines_kind: str  # "lnotab", "linetable310", "locations"
    co_code_adaptive: int  # 3.11+: the instructions, inline in the code object
    ascii_size: int  # sizeof(PyASCIIObject): a compact ASCII string's data
    compact_size: int  # sizeof(PyCompactUnicodeObject)
    stackref_mask: int = ~0  # 3.14+: f_executable is a tagged _PyStackRef


_L = FrameLayout
_OLD = dict(off_frame2=GIL_NO_OFFSET, off_prev=24, off_code=32, co_firstlineno=40,
            co_filename=104, co_name=112, co_lines=120, co_code_adaptive=0,
            ascii_size=48, compact_size=72)
TABLE: Dict[Tuple[int, int], FrameLayout] = {
    (3, 8): _L(off_frame=24, off_instr=104, instr_kind="lasti_bytes", lines_kind="lnotab", **_OLD),
    (3, 9): _L(off_frame=24, off_instr=104, instr_kind="lasti_bytes", lines_kind="lnotab", **_OLD),
    (3, 10): _L(off_frame=24, off_instr=96, instr_kind="lasti_units", lines_kind="linetable310",
                **_OLD),
    (3, 11): _L(56, 8, 48, 32, 56, "prev_instr", 72, 112, 128, 136, "locations", 184, 48, 72),
    (3, 12): _L(56, 0, 8, 0, 56, "prev_instr", 68, 112, 128, 136, "locations", 192, 40, 56),
    (3, 13): _L(72, GIL_NO_OFFSET, 8, 0, 56, "instr_ptr", 68, 112, 128, 136, "locations", 200,
                40, 56),
}


def from_debug_offsets(version: Tuple[int, int], words: Tuple[int, ...]) -> Optional[FrameLayout]:
    """The layout from ``_Py_DebugOffsets`` (3.13+; words: its uint64s after the
    cookie). Its tables are found by their shape, as layout.py does, since
    versions insert fields: thread_state {size, prev=0, next=8, interp=16,
    current_frame}; then interpreter_frame {size, previous=8, executable=0,
    instr_ptr}; then code_object {size, filename, name, qualname, linetable
    (8 apart), firstlineno, argcount, localsplusnames, localspluskinds,
    co_code_adaptive} (Include/internal/pycore_debug_offsets.h)."""
    n = len(words)
    ts = next((i for i in range(n - 5) if words[i + 1:i + 4] == (0, 8, 16)), None)
    if ts is None:
        return None
    fr = next((i for i in range(ts + 5, n - 4)
               if words[i + 1] == 8 and words[i + 2] == 0 and 0 < words[i + 3] < words[i] < 512),
              None)
    if fr is None:
        return None
    co = next((i for i in range(fr + 4, n - 10)
               if words[i + 1] and all(words[i + k + 1] == words[i + k] + 8 for k in (1, 2, 3))),
              None)
    if co is None:
        return None
    size, filename, _name, qualname, linetable, firstlineno = words[co:co + 6]
    adaptive = words[co + 9]
    tstate_size, current_frame = words[ts], words[ts + 4]
    if not (linetable < adaptive <= size < 4096 and firstlineno < size
            and current_frame < tstate_size):
        return None
    return FrameLayout(
        off_frame=current_frame, off_frame2=GIL_NO_OFFSET, off_prev=words[fr + 1],
        off_code=words[fr + 2], off_instr=words[fr + 3], instr_kind="instr_ptr",
        co_firstlineno=firstlineno, co_filename=filename, co_name=qualname,
        co_lines=linetable, lines_kind="locations", co_code_adaptive=adaptive,
        ascii_size=40, compact_size=56,
        stackref_mask=~7 if version >= (3, 14) else ~0)


# ---------------------------------------------------------------- line tables

def _varint(data: bytes, pos: int) -> Tuple[int, int]:
    shift = val = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        val |= (b & 63) << shift
        shift += 6
        if not b & 64:
            break
    return val, pos


def _svarint(data: bytes, pos: int) -> Tuple[int, int]:
    val, pos = _varint(data, pos)
    return (-(val >> 1) if val & 1 else val >> 1), pos


def line_from_locations(table: bytes, firstlineno: int, unit: int) -> Optional[int]:
    """3.11+ location table (Objects/locations.md): the line of code unit ``unit``."""
    line, addr, pos = firstlineno, 0, 0
    while pos < len(table):
        first = table[pos]
        pos += 1
        if not first & 0x80:
            return None  # not an entry start: a corrupt table
        code, length = (first >> 3) & 15, (first & 7) + 1
        delta = 0
        if code == 15:
            pass
        elif code == 14:
            delta, pos = _svarint(table, pos)
            for _ in range(3):
                _, pos = _varint(table, pos)
        elif code == 13:
            delta, pos = _svarint(table, pos)
        elif code >= 10:
            delta, pos = code - 10, pos + 2
        else:
            pos += 1
        line += delta
        if addr <= unit < addr + length:
            return None if code == 15 else line
        addr += length
    return None


def line_from_linetable310(table: bytes, firstlineno: int, offset: int) -> Optional[int]:
    """3.10 co_linetable (Objects/lnotab_notes.txt): (byte delta, line delta) pairs,
    line delta -128 for none; ``offset`` in bytes."""
    line, addr = firstlineno, 0
    for i in range(0, len(table) - 1, 2):
        sdelta, ldelta = table[i], struct.unpack_from("b", table, i + 1)[0]
        end = addr + sdelta
        if ldelta != -128:
            line += ldelta
        if addr <= offset < end:
            return None if ldelta == -128 else line
        addr = end
    return None


def line_from_lnotab(table: bytes, firstlineno: int, offset: int) -> int:
    """3.8/3.9 co_lnotab: (byte increment, signed line increment) pairs."""
    line, addr = firstlineno, 0
    for i in range(0, len(table) - 1, 2):
        addr += table[i]
        if addr > offset:
            break
        line += struct.unpack_from("b", table, i + 1)[0]
    return line


# ---------------------------------------------------------------- decoding

@dataclass(frozen=True)
class PyFrame:
    function: str
    file: str
    line: Optional[int]  # the instruction's line; None when the table has none
    first_line: int  # co_firstlineno


class CodeReader:
    """Reads code objects from one process's memory; caches each by address."""

    def __init__(self, pid: int, layout: FrameLayout, code_type: int) -> None:
        self.layout = layout
        self.code_type = code_type  # runtime address of PyCode_Type
        self._pid = pid
        self._mem: Optional[procfs.Memory] = None  # opened at the first read
        self._code: Dict[int, Optional[Tuple[str, str, int, bytes]]] = {}
        self._frames: Dict[Tuple[int, int], PyFrame] = {}  # (code, instr) -> its frame
        self.unreadable = 0  # frames left out: not a code object, or unreadable

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None

    def _read(self, address: int, size: int) -> bytes:
        if self._mem is None:
            try:
                self._mem = procfs.Memory(self._pid)
            except OtelGilError as err:  # gone, or not ours to read: an unreadable frame
                raise OSError(str(err)) from err
        data = self._mem.pread(address, size)  # (an OSError for an address past 2**63 too)
        if len(data) != size:
            raise OSError(f"short read at {address:#x}")
        return data

    def _u64(self, address: int) -> int:
        return int(struct.unpack("<Q", self._read(address, 8))[0])

    def _string(self, obj: int) -> str:
        """A str object's text: compact ASCII, or compact with its kind (the
        only forms a code object's names take: they are interned)."""
        lay = self.layout
        length, state = struct.unpack("<qI", self._read(obj + 16, 8) + self._read(obj + 32, 4))[:2]
        if not 0 <= length <= 4096:
            raise ValueError("implausible string length")
        n = min(length, MAX_NAME)
        kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
        if not compact or kind not in (1, 2, 4):
            raise ValueError("not a compact string")
        if ascii_:
            return printable(self._read(obj + lay.ascii_size, n).decode("ascii", "replace"))
        raw = self._read(obj + lay.compact_size, n * kind)
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
        return printable(raw.decode(codec, "replace"))

    def _code_fields(self, code: int) -> Optional[Tuple[str, str, int, bytes]]:
        if code in self._code:
            return self._code[code]
        lay = self.layout
        found: Optional[Tuple[str, str, int, bytes]] = None
        try:
            if self._u64(code + 8) == self.code_type:  # ob_type
                first = struct.unpack("<i", self._read(code + lay.co_firstlineno, 4))[0]
                name = self._string(self._u64(code + lay.co_name))
                filename = self._string(self._u64(code + lay.co_filename))
                table = self._u64(code + lay.co_lines)  # a bytes object
                size = self._u64(table + 16)  # ob_size
                lines = self._read(table + 32, min(size, MAX_LINETABLE)) if size > 0 else b""
                found = (name, filename, first, lines)
        except (OSError, ValueError, struct.error):
            found = None
        if len(self._code) > 65536:
            self._code.clear()
            self._frames.clear()
        self._code[code] = found
        return found

    def frame(self, code: int, instr: int) -> Optional[PyFrame]:
        lay = self.layout
        code &= lay.stackref_mask
        hit = self._frames.get((code, instr))
        if hit is not None:
            return hit
        fields = self._code_fields(code)
        if fields is None:
            self.unreadable += 1
            return None
        name, filename, first, table = fields
        found = PyFrame(name, filename, self._line(code, instr, first, table), first)
        if len(self._frames) > 65536:
            self._frames.clear()
        self._frames[(code, instr)] = found  # as long as its code object is cached
        return found

    def _line(self, code: int, instr: int, first: int, table: bytes) -> Optional[int]:
        lay = self.layout
        if lay.instr_kind in ("lasti_bytes", "lasti_units"):
            lasti = struct.unpack("<i", struct.pack("<I", instr & 0xFFFFFFFF))[0]
            offset = max(lasti, 0) * (2 if lay.instr_kind == "lasti_units" else 1)
            if lay.lines_kind == "lnotab":
                return line_from_lnotab(table, first, offset)
            return line_from_linetable310(table, first, offset)
        unit = (instr - (code + lay.co_code_adaptive)) // 2
        if not 0 <= unit < (1 << 24):
            return None
        return line_from_locations(table, first, unit)

    def frames(self, raw: List[Tuple[int, int]]) -> List[PyFrame]:
        """Frames, innermost first, from (code, instr) pairs the probes read."""
        out = []
        for code, instr in raw:
            f = self.frame(code, instr)
            if f is not None:
                out.append(f)
        return out
