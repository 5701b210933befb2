"""Reading code, not symbols: each take_gil/drop_gil copy's body (its `ret`
instructions and any way out of it a return probe would miss), the
symbol-free fallback's call target, what a probe costs on an instruction, and
the instructions themselves (sweep, PLT stubs, direct callers) that
otel_gil/target/sites.py places the probes with. Capstone, x86-64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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
class Insn:
    address: int
    size: int
    text: str
    code: bytes
    target: int | None  # direct jump or call target
    kind: str  # "jump", "cond", "call", "ret", "other"
    writes_rax: bool


def sweep(code: bytes, start: int) -> list[Insn]:
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
    out: list[Insn] = []
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
            out.append(Insn(insn.address, insn.size, f"{insn.mnemonic} {insn.op_str}".strip(),
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
        prev: Insn | None = None
        for insn in sweep(obj.read(start, size), start):
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
                   skip: list[tuple[int, int]]) -> list[Insn]:
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
    found: list[Insn] = []
    checked: dict[tuple[int, int], dict[int, Insn]] = {}
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
                cache: dict[tuple[int, int], dict[int, Insn]]) -> Insn | None:
    extent = obj.fde_extent(address)
    if extent is None:
        return None
    if extent not in cache:
        cache[extent] = {i.address: i for i in sweep(obj.read(*extent), extent[0])}
    return cache[extent].get(address)


