"""Native stacks of a GIL holder, unwound and symbolised in the sidecar.

The probes send the holder's user registers (ip, sp, bp) and a copy of the top
of its user stack (bpf/gil.bpf.c copy_user_stack), taken in its own context.
Here that copy is unwound with the objects' own ``.eh_frame`` call-frame
information, which every x86-64 object has (the ABI needs it for C++
exceptions and backtrace(3)), so no frame pointers are needed: Debian's and
sid's builds, libc and libffi have none. The kernel's frame-pointer walk
(BPF_STACK_TRACE) is used where this one stops early.

How exact: every frame whose caller's registers the CFI describes with the
usual rules (CFA = rsp/rbp + n, saved registers at CFA + n) is exact. The walk
stops at a DW_CFA expression rule (PLT stubs, signal frames), an address in no
object with CFI (JIT code), or the end of the copied stack (12 KiB), so a deep
C stack is cut at its outer end, never wrong inside.

Symbols: ``.symtab`` of the object, else of its debug file (by build-id, then
.gnu_debuglink, in the process's root then ours), else MiniDebugInfo, else
``.dynsym``. An LTO build's local copies keep GCC's suffixes
(``take_gil.lto_priv.0``); they are shown as such. Everything is cached per
build-id (per path for objects without one), never per process.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from otel_gil.elfsyms import STT_FUNC, ElfObject, debug_file_candidates, minidebuginfo
from otel_gil.errors import TargetError
from otel_gil.trust import printable

MAX_NATIVE_FRAMES = 64
MAX_SYMBOL = 256  # characters of a symbol name kept
MAX_CFI_STEPS = 512  # CFA instructions run per frame
RSP, RBP, RIP = 7, 6, 16  # DWARF x86-64 register numbers


@dataclass(frozen=True)
class NativeFrame:
    function: str  # "?" when no symbol covers the address
    object: str  # the ELF object's path, as mapped in the process
    offset: int  # address relative to the object's load base


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    file_offset: int
    path: str


def read_maps(pid: int) -> List[Mapping]:
    """The process's executable file mappings (/proc/PID/maps)."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines[:65536]:
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(Mapping(lo, hi, int(parts[2], 16), parts[5].rstrip("\n")))
    return sorted(out, key=lambda m: m.start)


# ---------------------------------------------------------------- one object

class ObjectInfo:
    """One ELF object's symbols and call-frame information."""

    def __init__(self, host_path: str, roots: Tuple[str, ...]) -> None:
        self.obj = ElfObject(host_path)
        self.segments = self.obj.load_segments()
        syms = self._symbols(roots)
        syms.sort()
        self._starts = [s[0] for s in syms]
        self._syms = syms
        self._cie_cache: Dict[int, "_Cie"] = {}

    def _symbols(self, roots: Tuple[str, ...]) -> List[Tuple[int, int, str]]:
        sources: List[ElfObject] = [self.obj]
        for path, _how in debug_file_candidates(self.obj, roots):
            try:
                sources.insert(0, ElfObject(path))
            except TargetError:
                continue
            break
        try:
            mini = minidebuginfo(self.obj)
        except TargetError:
            mini = None
        if mini is not None:
            sources.append(mini)
        for src in sources:
            for section in (".symtab", ".dynsym"):
                found = [(s.value, s.size, s.name.split("@", 1)[0]) for s in src.symbols(section)
                         if s.kind == STT_FUNC and s.value]
                if found:
                    return found
        return []

    def vaddr(self, file_offset: int) -> Optional[int]:
        """The link-time address of a file offset (through the PT_LOADs)."""
        for off, vaddr, size in self.segments:
            if off <= file_offset < off + size:
                return vaddr + file_offset - off
        return None

    def symbol(self, vaddr: int) -> str:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return "?"
        start, size, name = self._syms[i]
        # A symbol of size 0 (assembly without .size) is taken up to the next one.
        return name if vaddr < start + size or size == 0 else "?"

    # -------------------------------------------------------------- CFI

    def caller_rule(self, vaddr: int) -> Optional["_Rule"]:
        """How to find the caller's registers at ``vaddr`` (None: no CFI)."""
        try:
            entry = self.obj.fde_entry(vaddr)
            if entry is None:
                return None
            fde, start, _size = entry
            return _run_fde(self.obj, fde, start, vaddr, self._cie_cache)
        except (TargetError, IndexError, struct.error, ValueError, KeyError):
            return None  # CFI this walk does not read (or a corrupt one): the walk stops


@dataclass
class _Rule:
    cfa_reg: int
    cfa_off: int
    saved: Dict[int, int]  # register -> offset from the CFA where it is saved


@dataclass
class _Cie:
    code_align: int
    data_align: int
    ra_reg: int
    fde_enc: int
    has_z: bool
    instructions: bytes


def _uleb(data: bytes, pos: int) -> Tuple[int, int]:
    val = shift = 0
    while True:
        b = data[pos]
        pos += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80 or shift > 63:
            return val, pos


def _sleb(data: bytes, pos: int) -> Tuple[int, int]:
    val = shift = 0
    while True:
        b = data[pos]
        pos += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80 or shift > 63:
            if b & 0x40:
                val -= 1 << shift
            return val, pos


_PTR = {0x00: "<Q", 0x03: "<I", 0x04: "<Q", 0x0B: "<i", 0x0C: "<q", 0x02: "<H", 0x0A: "<h"}


def _parse_cie(obj: ElfObject, cie: int) -> _Cie:
    (length,) = struct.unpack("<I", obj.read(cie, 4))
    data = obj.read(cie + 4, min(length, 4096))
    pos = 5  # CIE id, version
    end = data.index(b"\0", pos)
    aug = data[pos:end].decode("ascii", "replace")
    pos = end + 1
    code_align, pos = _uleb(data, pos)
    data_align, pos = _sleb(data, pos)
    if data[4] == 1:
        ra_reg, pos = data[pos], pos + 1
    else:
        ra_reg, pos = _uleb(data, pos)
    fde_enc = 0
    if aug.startswith("z"):
        aug_len, pos = _uleb(data, pos)
        aug_end = pos + aug_len
        for ch in aug[1:]:
            if ch == "R":
                fde_enc, pos = data[pos], pos + 1
            elif ch == "L":
                pos += 1
            elif ch == "P":
                penc = data[pos]
                pos += 1 + struct.calcsize(_PTR.get(penc & 0x0F, "<Q"))
        pos = aug_end
    return _Cie(code_align, data_align, ra_reg, fde_enc, aug.startswith("z"), data[pos:])


def _run_fde(obj: ElfObject, fde: int, start: int, target: int,
             cache: Dict[int, _Cie]) -> Optional[_Rule]:
    length, cie_rel = struct.unpack("<Ii", obj.read(fde, 8))
    if length == 0xFFFFFFFF or length > 1 << 20:
        return None
    cie_at = fde + 4 - cie_rel
    cie = cache.get(cie_at)
    if cie is None:
        cie = cache[cie_at] = _parse_cie(obj, cie_at)
    body = obj.read(fde + 8, length - 4)
    width = struct.calcsize(_PTR.get(cie.fde_enc & 0x0F, "<Q"))
    pos = 2 * width
    if cie.has_z:
        aug_len, pos = _uleb(body, pos)
        pos += aug_len
    rule = _Rule(RSP, 8, {RIP: -8})
    initial = _execute(cie.instructions, cie, rule, start, None, None)
    if initial is None:
        return None
    return _execute(body[pos:], cie, initial, start, target, initial)


def _execute(code: bytes, cie: _Cie, rule: _Rule, loc: int, target: Optional[int],
             initial: Optional[_Rule]) -> Optional[_Rule]:
    """Run CFA instructions from ``loc`` until the row covering ``target``."""
    cur = _Rule(rule.cfa_reg, rule.cfa_off, dict(rule.saved))
    stack: List[_Rule] = []
    pos = steps = 0
    while pos < len(code) and steps < MAX_CFI_STEPS:
        steps += 1
        op = code[pos]
        pos += 1
        hi, lo = op >> 6, op & 0x3F
        advance = 0
        if hi == 1:
            advance = lo * cie.code_align
        elif hi == 2:
            off, pos = _uleb(code, pos)
            cur.saved[lo] = off * cie.data_align
        elif hi == 3:
            _restore(cur, lo, initial)
        elif op == 0x00:
            pass
        elif op in (0x02, 0x03, 0x04):
            fmt = {0x02: "<B", 0x03: "<H", 0x04: "<I"}[op]
            (delta,) = struct.unpack_from(fmt, code, pos)
            pos += struct.calcsize(fmt)
            advance = delta * cie.code_align
        elif op in (0x05, 0x11):  # offset_extended(_sf)
            reg, pos = _uleb(code, pos)
            off, pos = (_uleb if op == 0x05 else _sleb)(code, pos)
            cur.saved[reg] = off * cie.data_align
        elif op in (0x06, 0x08):  # restore_extended, same_value
            reg, pos = _uleb(code, pos)
            _restore(cur, reg, initial) if op == 0x06 else cur.saved.pop(reg, None)
        elif op == 0x07:  # undefined
            reg, pos = _uleb(code, pos)
            cur.saved[reg] = 1 << 40  # marks "not recoverable"
        elif op == 0x09:  # register: in another register; not followed
            reg, pos = _uleb(code, pos)
            _, pos = _uleb(code, pos)
            cur.saved[reg] = 1 << 40
        elif op == 0x0A:
            stack.append(_Rule(cur.cfa_reg, cur.cfa_off, dict(cur.saved)))
        elif op == 0x0B:
            if stack:
                cur = stack.pop()
        elif op in (0x0C, 0x12):  # def_cfa(_sf)
            cur.cfa_reg, pos = _uleb(code, pos)
            off, pos = (_uleb if op == 0x0C else _sleb)(code, pos)
            cur.cfa_off = off * (1 if op == 0x0C else cie.data_align)
        elif op == 0x0D:
            cur.cfa_reg, pos = _uleb(code, pos)
        elif op in (0x0E, 0x13):
            off, pos = (_uleb if op == 0x0E else _sleb)(code, pos)
            cur.cfa_off = off * (1 if op == 0x0E else cie.data_align)
        elif op == 0x2E:  # GNU_args_size
            _, pos = _uleb(code, pos)
        elif op in (0x0F, 0x10, 0x16):  # expressions: not evaluated here
            if op != 0x0F:
                reg, pos = _uleb(code, pos)
            n, pos = _uleb(code, pos)
            pos += n
            if op == 0x0F:
                cur.cfa_reg = -1
            else:
                cur.saved[reg] = 1 << 40
        elif op == 0x14:  # val_offset: not a saved slot
            reg, pos = _uleb(code, pos)
            _, pos = _uleb(code, pos)
            cur.saved[reg] = 1 << 40
        else:
            return None
        if advance:
            if target is not None and loc + advance > target:
                break
            loc += advance
    return cur


def _restore(cur: _Rule, reg: int, initial: Optional[_Rule]) -> None:
    if initial is not None and reg in initial.saved:
        cur.saved[reg] = initial.saved[reg]
    else:
        cur.saved.pop(reg, None)


# ---------------------------------------------------------------- the cache

_OBJECTS: Dict[Tuple[str, int, int], Optional[ObjectInfo]] = {}  # (host path, dev, ino)
_BY_BUILD_ID: Dict[str, ObjectInfo] = {}


def object_info(host_path: str, roots: Tuple[str, ...]) -> Optional[ObjectInfo]:
    """The object at host_path, parsed once per build-id (per file without one)."""
    try:
        st = os.stat(host_path)
    except OSError:
        return None
    key = (host_path, st.st_dev, st.st_ino)
    if key in _OBJECTS:
        return _OBJECTS[key]
    info: Optional[ObjectInfo] = None
    try:
        with ElfObject(host_path) as probe:
            bid = probe.build_id()
        info = _BY_BUILD_ID.get(bid) if bid else None
        if info is None:
            info = ObjectInfo(host_path, roots)
            if bid:
                _BY_BUILD_ID[bid] = info
    except Exception:  # noqa: BLE001 - a corrupt or hostile object: no frames from it
        info = None
    if len(_OBJECTS) > 4096:
        _OBJECTS.clear()
    _OBJECTS[key] = info
    return info


class Unwinder:
    """Unwinds and symbolises the native stacks of one process."""

    def __init__(self, pid: int, root: str) -> None:
        self.pid = pid
        self.root = root  # host path of the process's /
        self.roots: Tuple[str, ...] = tuple(dict.fromkeys((root, "/")))
        self._maps: List[Mapping] = []
        self._starts: List[int] = []

    def _mapping(self, address: int) -> Optional[Mapping]:
        for attempt in range(2):
            i = bisect.bisect_right(self._starts, address) - 1
            if i >= 0 and self._maps[i].start <= address < self._maps[i].end:
                return self._maps[i]
            if attempt == 0:  # new mappings since (dlopen): read them again
                self._maps = read_maps(self.pid)
                self._starts = [m.start for m in self._maps]
        return None

    def _locate(self, address: int) -> Optional[Tuple[Mapping, ObjectInfo, int]]:
        m = self._mapping(address)
        if m is None:
            return None
        # The mapped file itself, wherever its path points from the process's
        # mount namespace or chroot (maps shows the path as the kernel sees it).
        info = object_info(f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}", self.roots)
        if info is None:
            return None
        vaddr = info.vaddr(address - m.start + m.file_offset)
        return None if vaddr is None else (m, info, vaddr)

    def frame(self, address: int, is_return: bool) -> NativeFrame:
        """The frame of a pc (a return address is looked up one byte back:
        the call may be a function's last instruction)."""
        where = self._locate(address - 1 if is_return else address)
        if where is None:
            m = self._mapping(address)
            return NativeFrame("?", printable(m.path) if m else "?",
                               address - m.start if m else address)
        m, info, vaddr = where
        # Symbol names and paths come from the target's files: made printable.
        return NativeFrame(printable(info.symbol(vaddr)[:MAX_SYMBOL]), printable(m.path),
                           vaddr + (1 if is_return else 0))

    def unwind(self, ip: int, sp: int, bp: int, stack: bytes) -> List[int]:
        """Program counters, innermost first, by the CFI, from the copied stack."""
        pcs = [ip]
        regs = {RSP: sp, RBP: bp, RIP: ip}
        for depth in range(MAX_NATIVE_FRAMES - 1):
            where = self._locate(regs[RIP] - (1 if depth else 0))
            if where is None:
                break
            rule = where[1].caller_rule(where[2])
            if rule is None or rule.cfa_reg not in (RSP, RBP) or rule.saved.get(RIP, 0) >= 1 << 40:
                break
            cfa = regs[rule.cfa_reg] + rule.cfa_off
            nxt = dict(regs)
            for reg, off in rule.saved.items():
                if off >= 1 << 40 or reg not in (RBP, RIP):
                    continue
                at = cfa + off - sp
                if not 0 <= at <= len(stack) - 8:
                    return pcs
                nxt[reg] = struct.unpack_from("<Q", stack, at)[0]
            nxt[RSP] = cfa
            if nxt[RIP] == 0 or cfa <= regs[RSP]:
                break
            regs = nxt
            pcs.append(regs[RIP])
        return pcs
