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

from otel_gil.errors import TargetError
from otel_gil.stacks import cfi
from otel_gil.stacks.cfi import RBP, RIP, RSP
from otel_gil.target import procfs
from otel_gil.target.elf import STT_FUNC, ElfObject, debug_file_candidates, minidebuginfo
from otel_gil.trust import printable

MAX_NATIVE_FRAMES = 64
MAX_SYMBOL = 256  # characters of a symbol name kept
MAX_RULES = 16384  # caller rules kept per object (cleared past it)


@dataclass(frozen=True)
class NativeFrame:
    function: str  # "?" when no symbol covers the address
    object: str  # the ELF object's path, as mapped in the process
    offset: int  # address relative to the object's load base


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
        self._cie_cache: Dict[int, cfi.Cie] = {}
        # vaddr -> its caller rule: the CFI is static, and stacks return
        # through the same call sites again and again.
        self._rules: Dict[int, Optional[cfi.Rule]] = {}

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

    def caller_rule(self, vaddr: int) -> Optional[cfi.Rule]:
        """How to find the caller's registers at ``vaddr`` (None: no CFI). The
        rule is cached and shared: callers only read it."""
        try:
            return self._rules[vaddr]
        except KeyError:
            pass
        rule = self._parse_rule(vaddr)
        if len(self._rules) >= MAX_RULES:
            self._rules.clear()
        self._rules[vaddr] = rule
        return rule

    def _parse_rule(self, vaddr: int) -> Optional[cfi.Rule]:
        try:
            entry = self.obj.fde_entry(vaddr)
            if entry is None:
                return None
            fde, start, _size = entry
            return cfi.run_fde(self.obj, fde, start, vaddr, self._cie_cache)
        except (TargetError, IndexError, struct.error, ValueError, KeyError):
            return None  # CFI this walk does not read (or a corrupt one): the walk stops


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
        self._maps: List[procfs.ExecMapping] = []
        self._starts: List[int] = []
        # Each mapping's object, looked up once (a stat and the build-id cache).
        self._infos: Dict[procfs.ExecMapping, Optional[ObjectInfo]] = {}
        self._frames: Dict[Tuple[int, bool], NativeFrame] = {}  # (pc, is_return) -> frame

    def _mapping(self, address: int) -> Optional[procfs.ExecMapping]:
        for attempt in range(2):
            i = bisect.bisect_right(self._starts, address) - 1
            if i >= 0 and self._maps[i].start <= address < self._maps[i].end:
                return self._maps[i]
            if attempt == 0:  # new mappings since (dlopen): read them again
                self._maps = procfs.executable_maps(self.pid)
                self._starts = [m.start for m in self._maps]
                live = set(self._maps)
                self._infos = {m: i for m, i in self._infos.items() if m in live}
                self._frames.clear()  # a pc may belong to another object now
        return None

    def _locate(self, address: int) -> Optional[Tuple[procfs.ExecMapping, ObjectInfo, int]]:
        m = self._mapping(address)
        if m is None:
            return None
        try:
            info = self._infos[m]
        except KeyError:
            # The mapped file itself, wherever its path points from the process's
            # mount namespace or chroot (maps shows the path as the kernel sees it).
            info = object_info(f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}", self.roots)
            if info is not None:  # a failure (the file gone, EACCES) is tried again
                if len(self._infos) > 4096:
                    self._infos.clear()
                self._infos[m] = info
        if info is None:
            return None
        vaddr = info.vaddr(address - m.start + m.file_offset)
        return None if vaddr is None else (m, info, vaddr)

    def frame(self, address: int, is_return: bool) -> NativeFrame:
        """The frame of a pc (a return address is looked up one byte back:
        the call may be a function's last instruction)."""
        key = (address, is_return)
        hit = self._frames.get(key)
        if hit is None:
            hit = self._frame(address, is_return)
            if hit.function != "?":  # an unknown pc is looked up again next time
                if len(self._frames) > 16384:
                    self._frames.clear()
                self._frames[key] = hit
        return hit

    def _frame(self, address: int, is_return: bool) -> NativeFrame:
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
