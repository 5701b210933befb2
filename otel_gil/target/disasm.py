"""Reading code, not symbols: each take_gil/drop_gil copy's body (its `ret`
instructions and any way out of it a return probe would miss), and the
symbol-free fallback's call target. Disassembly with capstone (x86-64).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from otel_gil.errors import TargetError
from otel_gil.target.elf import STT_FUNC, ElfObject, Symbol


@dataclass(frozen=True)
class Function:
    """One copy of take_gil or drop_gil, at link-time addresses of its ELF object.

    ``notes`` lists what the disassembly found that a return probe would miss
    (a jump leaving the function, an indirect jump, undecodable bytes); it is
    empty for every take_gil copy on the machines checked.
    """

    name: str
    address: int
    size: int
    ret_addresses: tuple[int, ...]
    source: str
    notes: tuple[str, ...] = ()


@dataclass
class _Body:
    rets: list[int]
    exits: list[tuple[int, int]]  # (jump instruction, target outside the body)
    notes: list[str]


def _scan(code: bytes, start: int) -> _Body:
    """Linear sweep of one function body with capstone (x86-64)."""
    from capstone import CS_ARCH_X86, CS_GRP_JUMP, CS_GRP_RET, CS_MODE_64, Cs
    from capstone.x86 import X86_OP_IMM

    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    body = _Body([], [], [])
    end = start + len(code)
    offset = 0
    while offset < len(code):
        last = offset
        for insn in md.disasm(code[offset:], start + offset):
            last = insn.address + insn.size - start
            if insn.group(CS_GRP_RET):
                body.rets.append(insn.address)
            elif insn.group(CS_GRP_JUMP):
                ops = insn.operands
                if ops and ops[0].type == X86_OP_IMM:
                    if not start <= ops[0].imm < end:
                        body.exits.append((insn.address, ops[0].imm))
                else:
                    body.notes.append(f"indirect {insn.mnemonic} at {insn.address:#x}")
        if last == offset:  # capstone stopped on a byte it cannot decode
            body.notes.append(f"undecodable byte at {start + offset:#x}")
            last += 1
        offset = last
    return body


def analyse_function(
    obj: ElfObject, name: str, address: int, size: int, source: str, colds: list[Symbol]
) -> Function:
    """Every ``ret`` of a function, following jumps into its own ``.cold`` parts.

    GCC moves unlikely paths of take_gil into ``take_gil[...].cold`` (Debian
    3.11). A return from such a part is a return from take_gil, so its rets
    count; any other jump out of the body is recorded in ``notes``.
    """
    body = _scan(obj.read(address, size), address)
    rets = list(body.rets)
    notes = list(body.notes)
    parts = {c.value: c for c in colds if c.name.startswith(name + ".cold")}
    scanned: set[int] = set()
    for insn, target in body.exits:
        part = next((p for p in parts.values() if p.value <= target < p.value + p.size), None)
        if part is None:
            part = _unnamed_part(obj, target)
            parts[part.value] = part
            if part.size == 0:
                notes.append(f"jump at {insn:#x} leaves the function to {target:#x}")
                continue
        if part.value in scanned:
            continue
        scanned.add(part.value)
        cold = _scan(obj.read(part.value, part.size), part.value)
        if cold.rets and not part.name.startswith(name + ".cold"):
            # Unnamed code that returns: maybe a tail call into another function,
            # whose rets also serve other callers. Not probed; said so instead.
            notes.append(f"jump at {insn:#x} to {part.name}, which returns: not seen")
            continue
        rets.extend(r for r in cold.rets if r not in rets)
        notes.extend(cold.notes)
        for c_insn, c_target in cold.exits:
            if not address <= c_target < address + size:
                notes.append(f"jump at {c_insn:#x} in {part.name} leaves to {c_target:#x}")
    return Function(name, address, size, tuple(sorted(rets)), source, tuple(dict.fromkeys(notes)))


def _unnamed_part(obj: ElfObject, target: int) -> Symbol:
    """The code region (by its .eh_frame FDE) a jump lands in, when no symbol names it.

    In a stripped LTO build the ``.cold`` part of take_gil has no name; its FDE
    still gives its extent, so its rets (normally none) can be counted.
    """
    extent = obj.fde_extent(target)
    if extent is None:
        return Symbol(f"code at {target:#x}", target, 0, STT_FUNC)
    return Symbol(f"unnamed part at {extent[0]:#x}", extent[0], extent[1], STT_FUNC)


def first_local_branch(obj: ElfObject, func: Symbol) -> int | None:
    """Target of the first call/jmp in ``func`` that is neither PLT nor an export.

    ``PyEval_AcquireLock`` calls or tail-jumps to take_gil in every build checked
    (3.8: to ``take_gil.constprop.0``); the other branches in it go to
    ``__tls_get_addr@plt`` or exported fatal-error helpers, which are skipped.
    """
    from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_MODE_64, Cs
    from capstone.x86 import X86_OP_IMM

    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    plts = obj.plt_ranges()
    exports = obj.exported_functions()
    for insn in md.disasm(obj.read(func.value, func.size), func.value):
        if not (insn.group(CS_GRP_CALL) or insn.group(CS_GRP_JUMP)):
            continue
        ops = insn.operands
        if not ops or ops[0].type != X86_OP_IMM:
            continue
        target = int(ops[0].imm)
        if func.value <= target < func.value + func.size:
            continue
        if any(lo <= target < lo + n for lo, n in plts) or target in exports:
            continue
        return target
    return None


# ------------------------------------------------------------------ probe sites
#
# What a uprobe costs depends on the instruction under it. The x86-64 kernel
# (arch/x86/kernel/uprobes.c, arch_uprobe_analyze_insn) refuses instructions
# with a CS/DS/ES/SS or LOCK prefix (is_prefix_bad), emulates a few without a
# second trap (branch_setup_xol_ops: jmp rel8/rel32, call rel32, every jcc,
# not with a 0x66 prefix; push_setup_xol_ops: `push reg`, 50-57 and 41 50-57),
# and single-steps every other instruction out of line: a second trap (#DB),
# which under KVM is a VM exit (~6.8 µs here, against ~0.55 µs emulated;
# bench/README.md). NOPs are emulated too, since Linux 6.16 all canonical ones,
# but they are only padding here and never chosen.

EMULATED = "emulated"
SINGLE_STEPPED = "single-stepped"
REFUSED = "refused"
_BAD_PREFIXES = frozenset((0x26, 0x2E, 0x36, 0x3E, 0xF0))
_LEGACY_PREFIXES = _BAD_PREFIXES | {0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}
TIMED_WAITS = ("pthread_cond_timedwait", "pthread_cond_clockwait")
COND_SIGNAL = "pthread_cond_signal"


def probe_cost(code: bytes) -> str:
    """How the kernel handles a uprobe on the instruction starting ``code``."""
    i = 0
    prefixes = set()
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        prefixes.add(code[i])
        i += 1
    if prefixes & _BAD_PREFIXES:
        return REFUSED
    rex = code[i] if i < len(code) and 0x40 <= code[i] <= 0x4F else None
    if rex is not None:
        i += 1
    if i >= len(code):
        return SINGLE_STEPPED
    op = code[i]
    branch = op in (0xE8, 0xE9, 0xEB) or 0x70 <= op <= 0x7F or (
        op == 0x0F and i + 1 < len(code) and 0x80 <= code[i + 1] <= 0x8F)
    if branch and 0x66 not in prefixes:
        return EMULATED
    if 0x50 <= op <= 0x57 and not prefixes and rex in (None, 0x41):
        return EMULATED
    return SINGLE_STEPPED


@dataclass(frozen=True)
class Site:
    """One probe point, at a link-time address of the interpreter's ELF object.

    ``role``: "held" (take_gil has the GIL), "wait" (a timed wait on gil->cond
    begins), "wake" (that wait returned; the waiter holds gil->mutex), or
    "release" (a call of pthread_cond_signal, kept when rdi is &gil->cond).
    ``result_in_rax``: at a wake site, rax still holds the wait's return value.
    """

    role: str
    function: str
    address: int
    insn: str
    cost: str
    result_in_rax: bool = False


@dataclass(frozen=True)
class ProbeSites:
    """Where the probes go in one interpreter build, and what could not be placed."""

    held: tuple[Site, ...]
    waits: tuple[Site, ...]
    wakes: tuple[Site, ...]
    releases: tuple[Site, ...]  # empty: libc's pthread_cond_signal entry is used
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Insn:
    address: int
    size: int
    text: str
    code: bytes
    target: int | None  # direct jump or call target
    kind: str  # "jump", "cond", "call", "ret", "other"
    writes_rax: bool


def _sweep(code: bytes, start: int) -> list[_Insn]:
    from capstone import CS_ARCH_X86, CS_GRP_CALL, CS_GRP_JUMP, CS_GRP_RET, CS_MODE_64, Cs
    from capstone.x86 import (
        X86_OP_IMM,
        X86_REG_AH,
        X86_REG_AL,
        X86_REG_AX,
        X86_REG_EAX,
        X86_REG_RAX,
    )

    rax = {X86_REG_RAX, X86_REG_EAX, X86_REG_AX, X86_REG_AL, X86_REG_AH}
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    out: list[_Insn] = []
    offset = 0
    while offset < len(code):
        last = offset
        for insn in md.disasm(code[offset:], start + offset):
            last = insn.address + insn.size - start
            ops = insn.operands
            target = int(ops[0].imm) & 0xFFFFFFFFFFFFFFFF if (
                ops and ops[0].type == X86_OP_IMM) else None
            if insn.group(CS_GRP_RET):
                kind = "ret"
            elif insn.group(CS_GRP_CALL):
                kind = "call"
            elif insn.group(CS_GRP_JUMP):
                kind = "jump" if insn.mnemonic in ("jmp", "bnd jmp", "notrack jmp") else "cond"
            else:
                kind = "other"
            written = set(insn.regs_access()[1])
            out.append(_Insn(insn.address, insn.size, f"{insn.mnemonic} {insn.op_str}".strip(),
                             bytes(insn.bytes), target, kind,
                             kind == "call" or bool(written & rax)))
        if last == offset:
            last += 1  # undecodable byte: skipped (analyse_function notes it)
        offset = last
    return out


def plt_stubs(obj: ElfObject, names: tuple[str, ...]) -> dict[int, str]:
    """PLT stub address -> imported function, for the functions in ``names``.

    Each stub (.plt, .plt.sec with IBT, .plt.got) is `jmp *GOT(%rip)` (maybe
    after endbr64, maybe `bnd`); the GOT slot's relocation names the function.
    """
    slots: dict[int, str] = {}
    dynsym = obj.elf.get_section_by_name(".dynsym")
    if dynsym is None:
        return {}
    strtab = obj.elf.get_section(dynsym["sh_link"]).data()
    syms = dynsym.data()
    wanted = {n.encode() for n in names}
    for sec_name in (".rela.plt", ".rela.dyn"):
        sec = obj.elf.get_section_by_name(sec_name)
        if sec is None or sec["sh_type"] != "SHT_RELA":
            continue
        # Elf64_Rela: r_offset, r_info (symbol index << 32 | type), r_addend
        for r_offset, r_info, _addend in struct.iter_unpack("<QQq", sec.data()):
            index = r_info >> 32
            if not index or 24 * index + 24 > len(syms):
                continue
            (name_off,) = struct.unpack_from("<I", syms, 24 * index)
            name = strtab[name_off: strtab.find(b"\0", name_off)]
            if name in wanted:
                slots[r_offset] = name.decode()
    stubs: dict[int, str] = {}
    if not slots:
        return stubs
    for start, size in obj.plt_ranges():
        prev: _Insn | None = None
        for insn in _sweep(obj.read(start, size), start):
            # jmp qword ptr [rip + disp32]: ff 25, maybe after f2 (bnd)
            code = insn.code.lstrip(b"\xf2")
            if code[:2] == b"\xff\x25" and len(code) == 6:
                got = insn.address + insn.size + int.from_bytes(code[2:6], "little", signed=True)
                if got in slots:
                    # Calls target the stub, which may begin with endbr64 (IBT .plt.sec).
                    entry = prev.address if prev is not None and prev.code == ENDBR64 and \
                        prev.address + prev.size == insn.address else insn.address
                    stubs[entry] = slots[got]
            prev = insn
    return stubs


ENDBR64 = b"\xf3\x0f\x1e\xfa"


def direct_callers(obj: ElfObject, stubs: dict[int, str],
                   skip: list[tuple[int, int]]) -> list[_Insn]:
    """Every `call`/`jmp rel32` in .text to one of ``stubs``, outside ``skip``.

    Candidates come from a byte scan (e8/e9 + rel32 landing on a stub); each is
    kept only if decoding its function (from its .eh_frame FDE) from the start
    lands on it, so a stray e8 byte inside another instruction is never probed.
    """
    text = obj.section_range(".text")
    if text is None or not stubs:
        return []
    base, size = text
    data = obj.read(base, size)
    found: list[_Insn] = []
    checked: dict[tuple[int, int], dict[int, _Insn]] = {}
    for opcode in (b"\xe8", b"\xe9"):
        at = data.find(opcode)
        while 0 <= at <= len(data) - 5:
            (rel,) = struct.unpack_from("<i", data, at + 1)
            address = base + at
            if address + 5 + rel in stubs and not any(lo <= address < hi for lo, hi in skip):
                insn = _decoded_at(obj, address, checked)
                if insn is not None:
                    found.append(insn)
            at = data.find(opcode, at + 1)
    return sorted(found, key=lambda i: i.address)


def _decoded_at(obj: ElfObject, address: int,
                cache: dict[tuple[int, int], dict[int, _Insn]]) -> _Insn | None:
    extent = obj.fde_extent(address)
    if extent is None:
        return None
    if extent not in cache:
        cache[extent] = {i.address: i for i in _sweep(obj.read(*extent), extent[0])}
    return cache[extent].get(address)


_WALK_LIMIT = 64  # instructions searched around a ret or a wait for an emulated one
# Functions that never return: a branch into a straight run that calls one of
# these is a dead end (CPython's fatal-error paths in take_gil).
NORETURN = ("_Py_FatalErrorFunc", "Py_FatalError", "_Py_FatalErrorFormat",
            "_Py_FatalError_TstateNULL", "PyThread_exit_thread", "abort", "__assert_fail",
            "__stack_chk_fail")


def _site(role: str, fn: str, insn: _Insn, result_in_rax: bool = False) -> Site:
    return Site(role, fn, insn.address, insn.text, probe_cost(insn.code), result_in_rax)


class _Flow:
    """The instructions of one take_gil copy and its parts, with who jumps where."""

    def __init__(self, bodies: list[list[_Insn]], noreturn: set[int]) -> None:
        self.at: dict[int, tuple[int, int]] = {}
        self.bodies = bodies
        self.preds: dict[int, list[_Insn]] = {}
        self.noreturn = noreturn
        for b, body in enumerate(bodies):
            for k, insn in enumerate(body):
                self.at[insn.address] = (b, k)
                if insn.kind in ("jump", "cond") and insn.target is not None:
                    self.preds.setdefault(insn.target, []).append(insn)

    def next(self, insn: _Insn) -> _Insn | None:
        b, k = self.at[insn.address]
        body = self.bodies[b]
        return body[k + 1] if k + 1 < len(body) and \
            body[k + 1].address == insn.address + insn.size else None

    def prev(self, insn: _Insn) -> _Insn | None:
        """The instruction that falls through into insn, if any."""
        b, k = self.at[insn.address]
        p = self.bodies[b][k - 1] if k else None
        if p is None or p.address + p.size != insn.address or p.kind in ("jump", "ret"):
            return None
        return p

    def dead_end(self, address: int | None) -> bool:
        """Does the code at address run straight (following jmps) into a call
        of a function that never returns?"""
        for _ in range(_WALK_LIMIT):
            if address is None or address not in self.at:
                return False
            b, k = self.at[address]
            insn = self.bodies[b][k]
            if insn.kind == "call":
                return insn.target in self.noreturn
            if insn.kind == "jump":
                address = insn.target
            elif insn.kind in ("cond", "ret"):
                return False
            else:
                nxt = self.next(insn)
                address = nxt.address if nxt is not None else None
        return False

    def covers(self, insn: _Insn, toward: int) -> bool:
        """Is insn an emulated site that, each time it runs, goes on to `toward`
        (or into a dead end)?"""
        if probe_cost(insn.code) != EMULATED:
            return False
        if insn.kind == "jump":
            return insn.target == toward
        if insn.kind == "cond":
            nxt = self.next(insn)
            other = insn.target if nxt is not None and nxt.address == toward else \
                (nxt.address if nxt is not None else None)
            return self.dead_end(other)
        return insn.kind in ("call", "other")  # call rel32 returns; push falls through

    def sites_before(self, insn: _Insn, seen: set[int]) -> list[_Insn] | None:
        """Emulated instructions such that every path reaching insn runs exactly
        one of them, and each of them always goes on to insn (or a dead end).
        None if some path has none before it forks or within reach."""
        for _ in range(_WALK_LIMIT):
            if insn.address in seen:
                return None  # a loop with no site in it
            seen.add(insn.address)
            found: list[_Insn] = []
            for jump in self.preds.get(insn.address, ()):
                if not self.covers(jump, insn.address):
                    return None  # a fork (or a single-stepped jump) into this path
                found.append(jump)
            prev = self.prev(insn)
            if prev is None:
                return found or None
            if self.covers(prev, insn.address):
                return found + [prev]
            if prev.kind == "cond":
                return None  # a fork: its other arm goes elsewhere
            if found:
                more = self.sites_before(prev, seen)
                return None if more is None else found + more
            insn = prev
        return None


def _held_sites(fn: str, flow: _Flow, ret: _Insn) -> list[Site]:
    """Where the GIL is held in take_gil: emulated instructions after its last
    MUTEX_UNLOCK(gil->mutex) such that each path to the ret runs exactly one
    (a call, the unlock's at the latest, is always one). Else the ret itself,
    single-stepped."""
    found = flow.sites_before(ret, set())
    if not found:
        return [_site("held", fn, ret)]
    return [_site("held", fn, i) for i in sorted(set(found), key=lambda i: i.address)]


def _wake_site(fn: str, flow: _Flow, call: _Insn) -> Site | None:
    """The first emulated instruction after the timed wait returns, reached
    straight from the call (nothing branches into the instructions between),
    or the instruction at the return address (single-stepped)."""
    rax_kept = True
    insn = flow.next(call)
    first = insn
    for _ in range(_WALK_LIMIT):
        if insn is None or flow.preds.get(insn.address):
            break
        if probe_cost(insn.code) == EMULATED:
            return _site("wake", fn, insn, rax_kept)
        if insn.kind in ("jump", "ret"):
            break
        rax_kept = rax_kept and not insn.writes_rax
        insn = flow.next(insn)
    return _site("wake", fn, first, True) if first is not None else None


def _bodies(obj: ElfObject, fn: Function, colds: list[Symbol]) -> list[list[_Insn]]:
    """The instructions of a take_gil copy and of the parts its jumps leave to
    (its ``.cold`` part, by symbol or, stripped, by .eh_frame FDE)."""
    body = _sweep(obj.read(fn.address, fn.size), fn.address)
    bodies = [body]
    seen: set[int] = set()
    for insn in body:
        if insn.kind not in ("jump", "cond") or insn.target is None or \
                fn.address <= insn.target < fn.address + fn.size:
            continue
        part = next(((c.value, c.size) for c in colds
                     if c.value <= insn.target < c.value + c.size), None) or \
            obj.fde_extent(insn.target)
        if part is None or part[0] in seen or not part[1]:
            continue
        seen.add(part[0])
        bodies.append(_sweep(obj.read(*part), part[0]))
    return bodies


def take_gil_sites(obj: ElfObject, fn: Function, colds: list[Symbol], stubs: dict[int, str],
                   noreturn: set[int]) -> tuple[list[Site], list[Site], list[Site], list[str]]:
    """(held, wait, wake) sites of one take_gil copy, and notes on what is off."""
    flow = _Flow(_bodies(obj, fn, colds), noreturn)
    held: list[Site] = []
    waits: list[Site] = []
    wakes: list[Site] = []
    notes: list[str] = []
    if any(i.kind == "jump" and i.target is None for i in flow.bodies[0]):
        notes.append(f"{fn.name}: an indirect jump; its targets are unknown")
    for n, body in enumerate(flow.bodies):
        for insn in body:
            if insn.address in fn.ret_addresses:
                held += _held_sites(fn.name, flow, insn)
            elif n == 0 and insn.kind == "call" and stubs.get(insn.target or -1) in TIMED_WAITS:
                # The wait loop is take_gil's hot path, never in a .cold part,
                # which may be shared with unrelated code.
                waits.append(_site("wait", fn.name, insn))
                wake = _wake_site(fn.name, flow, insn)
                if wake is not None:
                    wakes.append(wake)
    if not waits:
        notes.append(f"{fn.name}: no direct call of pthread_cond_timedwait found")
    return held, waits, wakes, notes


def probe_sites(obj: ElfObject, takes: list[Function], colds: list[Symbol],
                names: ElfObject | None = None) -> ProbeSites:
    """Every probe site of one interpreter build (otel_gil/probes/loader.py attaches them).

    The release sites are the direct calls of pthread_cond_signal outside
    take_gil: take_gil itself signals gil->switch_cond on every acquisition
    (FORCE_SWITCHING, ceval_gil.[ch]), which is never the GIL's cond, so
    probing it would only add a trap per transition. (Where LTO inlined
    drop_gil into take_gil's thread-exit path, that one release is not seen:
    the thread's exit ends its hold instead.)
    """
    stubs = plt_stubs(obj, TIMED_WAITS + (COND_SIGNAL,) + NORETURN)
    syms = names or obj
    noreturn = {a for a, n in stubs.items() if n in NORETURN} | {
        s.value for s in syms.symbols(".symtab") + syms.symbols(".dynsym")
        if s.kind == STT_FUNC and s.name.split("@")[0] in NORETURN}
    held: list[Site] = []
    waits: list[Site] = []
    wakes: list[Site] = []
    notes: list[str] = []
    skip: list[tuple[int, int]] = []
    for fn in takes:
        h, w, k, n = take_gil_sites(obj, fn, colds, stubs, noreturn)
        held += h
        waits += w
        wakes += k
        notes += n
        skip.append((fn.address, fn.address + fn.size))
        skip += [(c.value, c.value + c.size) for c in colds if c.name.startswith(fn.name + ".cold")]
    if len(held) < sum(len(fn.ret_addresses) for fn in takes):
        notes.append("a ret of take_gil was not reached by the site search")
    signal = {a: n for a, n in stubs.items() if n == COND_SIGNAL}
    releases = [_site("release", _where(names or obj, i.address), i) for i in
                direct_callers(obj, signal, skip)]
    if not releases:
        notes.append("no direct call of pthread_cond_signal: libc's entry is probed instead")
    return ProbeSites(tuple(held), tuple(waits), tuple(wakes), tuple(releases), tuple(notes))


def _where(obj: ElfObject, address: int) -> str:
    """The function holding an address, for reports: its symbol, else its FDE start."""
    for sym in obj.symbols(".symtab") or obj.symbols(".dynsym"):
        # a debug file has the symbols; its .eh_frame may be absent
        if sym.kind == STT_FUNC and sym.value <= address < sym.value + max(sym.size, 1):
            return sym.name
    try:
        extent = obj.fde_extent(address)
    except TargetError:
        extent = None
    return f"code at {extent[0]:#x}" if extent else f"code at {address:#x}"
