"""Reading code, not symbols: each take_gil/drop_gil copy's body (its `ret`
instructions and any way out of it a return probe would miss), and the
symbol-free fallback's call target. Disassembly with capstone (x86-64).
"""

from __future__ import annotations

from dataclasses import dataclass

from otel_gil.elfsyms import STT_FUNC, ElfObject, Symbol


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
