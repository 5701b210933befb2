"""DWARF call-frame information (``.eh_frame``), interpreted: for an address in
an object, the rule that gives its caller's registers (the CFA and where the
return address and rbp were saved). x86-64, the CIE/FDE formats of the LSB
and DWARF 4 section 6.4; used by otel_gil/stacks/unwind.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from otel_gil.target.elf import ElfObject

RSP, RBP, RIP = 7, 6, 16  # DWARF x86-64 register numbers


MAX_CFI_STEPS = 512  # CFA instructions run per frame


@dataclass
class Rule:
    cfa_reg: int
    cfa_off: int
    saved: Dict[int, int]  # register -> offset from the CFA where it is saved


@dataclass
class Cie:
    code_align: int
    data_align: int
    ra_reg: int
    fde_enc: int
    has_z: bool
    instructions: bytes


def uleb(data: bytes, pos: int) -> Tuple[int, int]:
    val = shift = 0
    while True:
        b = data[pos]
        pos += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80 or shift > 63:
            return val, pos


def sleb(data: bytes, pos: int) -> Tuple[int, int]:
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


PTR = {0x00: "<Q", 0x03: "<I", 0x04: "<Q", 0x0B: "<i", 0x0C: "<q", 0x02: "<H", 0x0A: "<h"}


def parse_cie(obj: ElfObject, cie: int) -> Cie:
    (length,) = struct.unpack("<I", obj.read(cie, 4))
    data = obj.read(cie + 4, min(length, 4096))
    pos = 5  # CIE id, version
    end = data.index(b"\0", pos)
    aug = data[pos:end].decode("ascii", "replace")
    pos = end + 1
    code_align, pos = uleb(data, pos)
    data_align, pos = sleb(data, pos)
    if data[4] == 1:
        ra_reg, pos = data[pos], pos + 1
    else:
        ra_reg, pos = uleb(data, pos)
    fde_enc = 0
    if aug.startswith("z"):
        aug_len, pos = uleb(data, pos)
        aug_end = pos + aug_len
        for ch in aug[1:]:
            if ch == "R":
                fde_enc, pos = data[pos], pos + 1
            elif ch == "L":
                pos += 1
            elif ch == "P":
                penc = data[pos]
                pos += 1 + struct.calcsize(PTR.get(penc & 0x0F, "<Q"))
        pos = aug_end
    return Cie(code_align, data_align, ra_reg, fde_enc, aug.startswith("z"), data[pos:])


def run_fde(obj: ElfObject, fde: int, start: int, target: int,
             cache: Dict[int, Cie]) -> Optional[Rule]:
    length, cie_rel = struct.unpack("<Ii", obj.read(fde, 8))
    if length == 0xFFFFFFFF or length > 1 << 20:
        return None
    cie_at = fde + 4 - cie_rel
    cie = cache.get(cie_at)
    if cie is None:
        cie = cache[cie_at] = parse_cie(obj, cie_at)
    body = obj.read(fde + 8, length - 4)
    width = struct.calcsize(PTR.get(cie.fde_enc & 0x0F, "<Q"))
    pos = 2 * width
    if cie.has_z:
        aug_len, pos = uleb(body, pos)
        pos += aug_len
    rule = Rule(RSP, 8, {RIP: -8})
    initial = execute(cie.instructions, cie, rule, start, None, None)
    if initial is None:
        return None
    return execute(body[pos:], cie, initial, start, target, initial)


def execute(code: bytes, cie: Cie, rule: Rule, loc: int, target: Optional[int],
             initial: Optional[Rule]) -> Optional[Rule]:
    """Run CFA instructions from ``loc`` until the row covering ``target``."""
    cur = Rule(rule.cfa_reg, rule.cfa_off, dict(rule.saved))
    stack: List[Rule] = []
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
            off, pos = uleb(code, pos)
            cur.saved[lo] = off * cie.data_align
        elif hi == 3:
            restore(cur, lo, initial)
        elif op == 0x00:
            pass
        elif op in (0x02, 0x03, 0x04):
            fmt = {0x02: "<B", 0x03: "<H", 0x04: "<I"}[op]
            (delta,) = struct.unpack_from(fmt, code, pos)
            pos += struct.calcsize(fmt)
            advance = delta * cie.code_align
        elif op in (0x05, 0x11):  # offset_extended(_sf)
            reg, pos = uleb(code, pos)
            off, pos = (uleb if op == 0x05 else sleb)(code, pos)
            cur.saved[reg] = off * cie.data_align
        elif op in (0x06, 0x08):  # restore_extended, same_value
            reg, pos = uleb(code, pos)
            restore(cur, reg, initial) if op == 0x06 else cur.saved.pop(reg, None)
        elif op == 0x07:  # undefined
            reg, pos = uleb(code, pos)
            cur.saved[reg] = 1 << 40  # marks "not recoverable"
        elif op == 0x09:  # register: in another register; not followed
            reg, pos = uleb(code, pos)
            _, pos = uleb(code, pos)
            cur.saved[reg] = 1 << 40
        elif op == 0x0A:
            stack.append(Rule(cur.cfa_reg, cur.cfa_off, dict(cur.saved)))
        elif op == 0x0B:
            if stack:
                cur = stack.pop()
        elif op in (0x0C, 0x12):  # def_cfa(_sf)
            cur.cfa_reg, pos = uleb(code, pos)
            off, pos = (uleb if op == 0x0C else sleb)(code, pos)
            cur.cfa_off = off * (1 if op == 0x0C else cie.data_align)
        elif op == 0x0D:
            cur.cfa_reg, pos = uleb(code, pos)
        elif op in (0x0E, 0x13):
            off, pos = (uleb if op == 0x0E else sleb)(code, pos)
            cur.cfa_off = off * (1 if op == 0x0E else cie.data_align)
        elif op == 0x2E:  # GNU_args_size
            _, pos = uleb(code, pos)
        elif op in (0x0F, 0x10, 0x16):  # expressions: not evaluated here
            if op != 0x0F:
                reg, pos = uleb(code, pos)
            n, pos = uleb(code, pos)
            pos += n
            if op == 0x0F:
                cur.cfa_reg = -1
            else:
                cur.saved[reg] = 1 << 40
        elif op == 0x14:  # val_offset: not a saved slot
            reg, pos = uleb(code, pos)
            _, pos = uleb(code, pos)
            cur.saved[reg] = 1 << 40
        else:
            return None
        if advance:
            if target is not None and loc + advance > target:
                break
            loc += advance
    return cur


def restore(cur: Rule, reg: int, initial: Optional[Rule]) -> None:
    if initial is not None and reg in initial.saved:
        cur.saved[reg] = initial.saved[reg]
    else:
        cur.saved.pop(reg, None)
