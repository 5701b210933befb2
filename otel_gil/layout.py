"""CPython version, flavour and GIL struct layout, read from the binary.

Where the GIL struct lives, per version (x86-64; cpython-gil.md, checked with
gdb ``print &((struct pyruntimestate*)0)->ceval.gil`` on the pyenv builds):

* 3.8 to 3.11: inline in ``_PyRuntime.ceval.gil`` (Include/internal/pycore_runtime.h).
* 3.12: ``_PyRuntime.interpreters.main->ceval.gil`` (a pointer; per-interpreter GIL,
  PEP 684, Include/internal/pycore_interp.h).
* 3.13+: the same pointer, with offsets published in ``_Py_DebugOffsets``, the first
  member of ``_PyRuntime`` (Include/internal/pycore_runtime.h in 3.13,
  pycore_debug_offsets.h in 3.14 and 3.15), statically initialised, so readable
  from the file. A version newer than 3.15 is read from them alone, unverified.

DWARF (when the object or its debug file has it) is preferred over the table;
only the one compilation unit that holds take_gil is parsed.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from typing import Any, Tuple

from otel_gil.elfsyms import ElfObject
from otel_gil.errors import TargetError

Version = Tuple[int, int, int]

DEBUG_COOKIE = b"xdebugpy"


@dataclass(frozen=True)
class GilLayout:
    """How to get from ``_PyRuntime`` to the GIL struct, and the struct's fields.

    Either ``inline_offset`` (the struct sits at _PyRuntime + offset) or the
    chain ``interp_offset`` (a PyInterpreterState* in _PyRuntime), optionally
    walked along ``interp_next``/``interp_id`` to the main interpreter (id 0),
    then ``gil_pointer_offset`` (interp->ceval.gil).
    """

    inline_offset: int | None
    interp_offset: int | None
    interp_next: int | None
    interp_id: int | None
    gil_pointer_offset: int | None
    interval: int
    locked: int
    cond: int
    enabled: int | None
    how: str
    # PyThreadState fields for the probes, where _Py_DebugOffsets publish them (3.15+).
    tstate_holds_gil: int | None = None
    tstate_gil_requested: int | None = None
    # In PyThreadState: thread_id (pthread_self(), every version) and
    # native_thread_id (the kernel tid, 3.11+); None where unknown.
    tstate_thread_id: int | None = None
    tstate_native_thread_id: int | None = None


SUPPORTED = ((3, 8), (3, 15))  # the versions whose layout and code were checked here


def supported_range() -> str:
    lo, hi = SUPPORTED
    return f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"


# _PyRuntime offsets of the inline GIL (3.8 to 3.11) or of interpreters.main and
# interp->ceval.gil (3.12, 3.13); gdb on pyenv 3.8.18 .. 3.13.0 gave these.
_INLINE: dict[tuple[int, int], int] = {(3, 8): 1152, (3, 9): 352, (3, 10): 352, (3, 11): 360}
_CHAIN: dict[tuple[int, int], tuple[int, int]] = {(3, 12): (48, 384), (3, 13): (640, 16)}
# PyThreadState thread_id / native_thread_id (gdb on the pyenv builds, Debian's
# 3.11 and sid's 3.14 -dbg, the free-threaded 3.13: the same in both flavours).
_TSTATE_IDS: dict[tuple[int, int], tuple[int, int | None]] = {
    (3, 8): (176, None), (3, 9): (176, None), (3, 10): (176, None), (3, 11): (152, 160),
    (3, 12): (136, 144), (3, 13): (152, 160), (3, 14): (152, 160)}

# 3.14 and 3.15 are never read from the table: their _Py_DebugOffsets sit in
# initialised data (.PyRuntime), readable from the file, stripped or not.


def decode_hexversion(value: int) -> Version:
    """PY_VERSION_HEX (Include/patchlevel.h) -> (major, minor, micro)."""
    return (value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF


def name_hint(path: str) -> tuple[int, int] | None:
    """(3, minor) from a file name like libpython3.13t.so.1.0 or python3.11."""
    m = re.search(r"python(\d)\.(\d+)", path.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class DebugOffsets:
    """The fields of ``_Py_DebugOffsets`` that locate the GIL (3.13+).

    ``verified`` is False for a version newer than the ones whose table layout
    is known here: its GIL fields were found by the self-check alone.
    """

    version: Version
    free_threaded: bool
    runtime_size: int
    interpreters_head: int
    interp_id: int
    interp_next: int
    ceval_gil: int
    gil_runtime_state: int
    gil_enabled: int
    gil_locked: int
    gil_holder: int
    verified: bool = True
    # PyThreadState.holds_gil / gil_requested, published from 3.15 on
    # (Include/cpython/pystate.h; take_gil sets gil_requested on entry, then
    # holds_gil=1, gil_requested=0 in one 8-byte store once it has the GIL).
    tstate_holds_gil: int | None = None
    tstate_gil_requested: int | None = None
    tstate_thread_id: int | None = None
    tstate_native_thread_id: int | None = None


# Where {ceval_gil, gil_runtime_state, enabled, locked, holder} start in the
# interpreter_state table, and how long that table is, per version whose
# header was read: 3.13 Include/internal/pycore_runtime.h; 3.14 and 3.15
# Include/internal/pycore_debug_offsets.h (3.14 inserted threads_main after
# threads_head, and code_object_generation/tlbc_generation at the end).
_INTERP_TABLE: dict[tuple[int, int], tuple[int, int]] = {
    (3, 13): (8, 13), (3, 14): (9, 16), (3, 15): (9, 16),
}
# In 3.15's thread_state table: holds_gil and gil_requested (indices).
_TSTATE_GIL_FIELDS: dict[tuple[int, int], tuple[int, int]] = {(3, 15): (12, 13)}
# thread_id and native_thread_id in the thread_state table (indices), per
# header read: 3.13 and 3.14 {size, prev, next, interp, current_frame,
# thread_id, native_thread_id, ...}; 3.15 puts base_frame, last_profiled_frame
# and last_profiled_frame_seq before them (checked against the -dbg DWARF of
# sid's 3.15.2: 176 and 184, where 80 and 88 are base_frame and
# last_profiled_frame, an 8-apart pair too).
_TSTATE_ID_FIELDS: dict[tuple[int, int], tuple[int, int]] = {
    (3, 13): (5, 6), (3, 14): (5, 6), (3, 15): (8, 9),
}
_DEBUG_WORDS = 64  # enough uint64s to reach 3.15's thread_state table, and a newer search


def read_debug_offsets(obj: ElfObject, runtime: int) -> DebugOffsets | None:
    """Parse ``_Py_DebugOffsets`` at the start of ``_PyRuntime`` in the file.

    None when there is none (3.8 to 3.12 keep ``_PyRuntime`` in .bss or have no
    cookie). A version newer than the known ones is searched for a run of
    fields that passes the self-check, and marked unverified. Raises
    TargetError when the cookie is there but no such run is.
    """
    try:
        raw = obj.read(runtime, 8 + 8 * _DEBUG_WORDS)
    except TargetError:
        return None  # _PyRuntime in .bss (3.8, 3.9): no initialised data
    if raw[:8] != DEBUG_COOKIE:
        return None
    q = struct.unpack_from(f"<{_DEBUG_WORDS}Q", raw, 8)
    version, free_threaded = decode_hexversion(q[0]), bool(q[1])
    # runtime_state {size, finalizing, interpreters_head} starts at q[2], then
    # interpreter_state {size, id, next, threads_head, ...}.
    interp = q[5:]
    known = _INTERP_TABLE.get(version[:2])
    candidates = [known[0]] if known else list(range(4, 24))
    for gil_at in candidates:
        offsets = DebugOffsets(
            version, free_threaded, q[2], q[4], interp[1], interp[2],
            interp[gil_at], interp[gil_at + 1], interp[gil_at + 2], interp[gil_at + 3],
            interp[gil_at + 4], verified=known is not None,
        )
        if _self_check(offsets, interp[0]):
            offsets = _with_tstate_fields(offsets, q, known)
            ids = _thread_state_ids(q, 5 + gil_at + 5, _TSTATE_ID_FIELDS.get(version[:2]))
            return offsets if ids is None else replace(
                offsets, tstate_thread_id=ids[0], tstate_native_thread_id=ids[1])
    raise TargetError(
        f"{obj.path}: _Py_DebugOffsets of CPython {'.'.join(map(str, version))} have a "
        "layout this otel-gil does not know (no GIL fields that line up)"
    )


def _self_check(offsets: DebugOffsets, interp_size: int) -> bool:
    """last_holder and locked sit 8 and 16 bytes (16, 24 free-threaded) into
    the GIL struct, whose ``enabled`` offset is published relative to it (0);
    all of it inside PyInterpreterState. A misread table does not line up so."""
    shift = 8 if offsets.free_threaded else 0
    base = offsets.gil_runtime_state
    return (offsets.gil_holder - base == 8 + shift
            and offsets.gil_locked - base == 16 + shift
            and offsets.gil_enabled == 0
            and 0 < offsets.ceval_gil < interp_size and 0 < base < interp_size)


def _with_tstate_fields(offsets: DebugOffsets, q: tuple[int, ...],
                        known: tuple[int, int] | None) -> DebugOffsets:
    fields = _TSTATE_GIL_FIELDS.get(offsets.version[:2])
    if known is None or fields is None:
        return offsets
    tstate = q[5 + known[1]:]  # the thread_state table follows interpreter_state
    holds, requested = tstate[fields[0]], tstate[fields[1]]
    if not (holds < tstate[0] and requested < tstate[0]):  # inside sizeof(PyThreadState)
        return offsets
    return replace(offsets, tstate_holds_gil=holds, tstate_gil_requested=requested)


def _thread_state_ids(q: tuple[int, ...], start: int,
                      known: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """thread_id and native_thread_id from the debug offsets' thread_state table.

    It follows the interpreter_state table, which gains fields between
    versions (3.14: code_object_generation, tlbc_generation), so it is found
    by its own head {size, prev, next, interp, current_frame} with prev, next
    and interp at 0, 8 and 16 (Include/cpython/pystate.h). A known version's
    fields are taken at their indices in the table (_TSTATE_ID_FIELDS). For a
    later version, the pair (8 bytes apart) is taken only if it is the one
    such pair in the next 10 fields after current_frame: 3.15 alone has three.
    probes.holder_tid_source checks the result on the live process either way.
    """
    for i in range(start, len(q) - 6):
        size, prev, nxt, interp = q[i:i + 4]
        if (prev, nxt, interp) != (0, 8, 16):
            continue
        if known is not None:
            tid, native = q[i + known[0]], q[i + known[1]]
            return (tid, native) if 0 < tid < size and 0 < native < size else None
        tail = q[i + 5:i + 15]
        pairs = [(a, b) for a, b in zip(tail, tail[1:]) if 0 < a < size and b == a + 8]
        return pairs[0] if len(pairs) == 1 else None
    return None


def read_version(obj: ElfObject, runtime: int | None) -> tuple[Version, str]:
    """The CPython version from ``Py_Version``, ``_Py_DebugOffsets`` or PY_VERSION."""
    sym = obj.lookup("Py_Version", (".dynsym",))
    if sym is not None:  # exported const PY_VERSION_HEX since 3.11
        (value,) = struct.unpack("<I", obj.read(sym.value, 4))
        return decode_hexversion(value), "Py_Version"
    if runtime is not None:
        dbg = read_debug_offsets(obj, runtime)
        if dbg is not None:
            return dbg.version, "_Py_DebugOffsets"
    hint = name_hint(obj.path)
    # PY_VERSION ("3.8.18") is a string literal; the linker may tail-merge it
    # into a longer string (".../versions/3.8.18"), so only its end is anchored.
    found: dict[Version, int] = {}
    for m in re.finditer(rb"(?<![0-9.])3\.(\d+)\.(\d+)(?:(?:a|b|rc)\d+)?\+?\x00", obj.rodata()):
        v = (3, int(m.group(1)), int(m.group(2)))
        if hint is None or v[:2] == hint:
            found[v] = found.get(v, 0) + 1
    if not found:
        raise TargetError(f"{obj.path}: no CPython version string found in .rodata")
    best = max(found, key=lambda v: found[v])
    return best, "PY_VERSION in .rodata" + (f" (checked against {hint})" if hint else "")


def is_free_threaded(obj: ElfObject, runtime: int | None) -> bool:
    """Free-threaded (PEP 703) build: debug offsets, exports, or the ``t`` name."""
    if runtime is not None:
        dbg = read_debug_offsets(obj, runtime)
        if dbg is not None:
            return dbg.free_threaded
    for name in ("_Py_DecRefShared", "_Py_MergeZeroLocalRefcount"):
        if obj.lookup(name, (".dynsym",)) is not None:
            return True
    return re.search(r"python3\.\d+t\b", obj.path.rsplit("/", 1)[-1]) is not None


def table_layout(version: Version, free_threaded: bool) -> GilLayout:
    """The hard-coded fallback, tested against every pyenv build here."""
    key = version[:2]
    shift = 8 if free_threaded else 0  # a leading `int enabled`, padded to 8
    ids = _TSTATE_IDS.get(key, (None, None))
    fields: dict[str, Any] = {"interval": shift, "locked": 16 + shift, "cond": 32 + shift,
                              "enabled": 0 if free_threaded else None,
                              "tstate_thread_id": ids[0], "tstate_native_thread_id": ids[1]}
    label = f"{version[0]}.{version[1]} table"
    if key in _INLINE:
        off = _INLINE[key]
        return GilLayout(off, None, None, None, None, how=f"_PyRuntime+{off} ({label})", **fields)
    if key in _CHAIN:
        main, gil = _CHAIN[key]
        return GilLayout(None, main, None, None, gil,
                         how=f"*(*(_PyRuntime+{main})+{gil}) ({label})", **fields)
    raise TargetError(f"CPython {version[0]}.{version[1]} has no built-in GIL layout here "
                      f"(known: {supported_range()})")


def debug_offsets_layout(dbg: DebugOffsets, struct_fields: dict[str, int] | None) -> GilLayout:
    """GIL location from ``_Py_DebugOffsets``; field offsets from DWARF if given."""
    locked = dbg.gil_locked - dbg.gil_runtime_state
    fields = struct_fields or {"interval": locked - 16, "locked": locked, "cond": locked + 16}
    return GilLayout(
        None, dbg.interpreters_head, dbg.interp_next, dbg.interp_id, dbg.ceval_gil,
        interval=fields["interval"], locked=fields["locked"], cond=fields["cond"],
        enabled=dbg.gil_enabled if dbg.free_threaded else None,
        how="_Py_DebugOffsets" + (" + DWARF" if struct_fields else "")
            + ("" if dbg.verified else " (unverified layout)"),
        tstate_holds_gil=dbg.tstate_holds_gil, tstate_gil_requested=dbg.tstate_gil_requested,
        tstate_thread_id=dbg.tstate_thread_id, tstate_native_thread_id=dbg.tstate_native_thread_id,
    )


# ----------------------------------------------------------------- DWARF


def dwarf_layout(dwarf_obj: ElfObject, take_gil: int, version: Version) -> GilLayout | None:
    """GIL location and fields from the DWARF unit that defines take_gil.

    Parses one compilation unit (found through ``.debug_aranges``), never the
    whole of a libpython's DWARF. Returns None where the unit lacks a type.
    """
    fields = dwarf_gil_fields(dwarf_obj, take_gil)
    if fields is None:
        return None
    structs = _unit_structs(dwarf_obj, take_gil)
    if structs is None:
        return None
    runtime = structs.get("pyruntimestate")
    enabled = fields.get("enabled")
    ts = structs.get("_ts")
    common: dict[str, Any] = {"interval": fields["interval"], "locked": fields["locked"],
                              "cond": fields["cond"], "enabled": enabled,
                              "tstate_thread_id": _member_path(ts, ["thread_id"]),
                              "tstate_native_thread_id": _member_path(ts, ["native_thread_id"])}
    if version[:2] <= (3, 11):
        off = _member_path(runtime, ["ceval", "gil"])
        if off is None:
            return None
        return GilLayout(off, None, None, None, None, how="DWARF", **common)
    main = _member_path(runtime, ["interpreters", "main"])
    gil = _member_path(structs.get("_is"), ["ceval", "gil"])
    if main is None or gil is None:
        return None
    return GilLayout(None, main, None, None, gil, how="DWARF", **common)


def dwarf_gil_fields(dwarf_obj: ElfObject, take_gil: int) -> dict[str, int] | None:
    """Offsets of interval/locked/cond (and enabled) in struct _gil_runtime_state."""
    structs = _unit_structs(dwarf_obj, take_gil)
    gil = structs.get("_gil_runtime_state") if structs else None
    if gil is None:
        return None
    members = {
        _name(c) or "": _location(c)
        for c in gil.iter_children()  # type: ignore[attr-defined]
        if c.tag == "DW_TAG_member"
    }
    if not all(isinstance(members.get(k), int) for k in ("interval", "locked", "cond")):
        return None
    return {k: v for k, v in members.items() if isinstance(v, int)}


_UNIT_CACHE: dict[tuple[str, int], dict[str, object] | None] = {}


def _unit_structs(dwarf_obj: ElfObject, address: int) -> dict[str, object] | None:
    key = (dwarf_obj.path, address)
    if key not in _UNIT_CACHE:
        _UNIT_CACHE[key] = _load_unit_structs(dwarf_obj, address)
    return _UNIT_CACHE[key]


def _load_unit_structs(dwarf_obj: ElfObject, address: int) -> dict[str, object] | None:
    elf = dwarf_obj.elf
    if not elf.has_dwarf_info() or elf.get_section_by_name(".debug_info") is None:
        return None
    try:
        dwarf = elf.get_dwarf_info()
        aranges = dwarf.get_aranges()
        offset = aranges.cu_offset_at_addr(address) if aranges is not None else None
        if offset is None:
            return None
        unit = dwarf.get_CU_at(offset)
        if _name(unit.get_top_DIE()) == "<artificial>":
            # An LTO partition (Debian 3.11): its types live in other units,
            # reached only through DW_FORM_ref_addr chains; the table is used.
            return None
        wanted = {"_gil_runtime_state", "pyruntimestate", "_is", "_ts"}
        out: dict[str, object] = {}
        for die in unit.iter_DIEs():
            if die.tag != "DW_TAG_structure_type" or "DW_AT_declaration" in die.attributes:
                continue
            name = _name(die)
            if name in wanted and name not in out:
                out[name] = die
                if len(out) == len(wanted):
                    break
        return out
    except Exception:  # noqa: BLE001 - malformed or unusual DWARF: use the table
        return None


def _name(die: object) -> str | None:
    attr = die.attributes.get("DW_AT_name")  # type: ignore[attr-defined]
    return attr.value.decode(errors="replace") if attr is not None else None


def _location(die: object) -> int | None:
    attr = die.attributes.get("DW_AT_data_member_location")  # type: ignore[attr-defined]
    return attr.value if attr is not None and isinstance(attr.value, int) else None


def _member_path(struct_die: object, path: list[str]) -> int | None:
    """Byte offset of ``a.b.c`` inside a struct DIE, following member types."""
    total = 0
    die = struct_die
    for i, member in enumerate(path):
        if die is None:
            return None
        child = next(
            (c for c in die.iter_children()  # type: ignore[attr-defined]
             if c.tag == "DW_TAG_member" and _name(c) == member),
            None,
        )
        loc = _location(child) if child is not None else None
        if child is None or loc is None:
            return None
        total += loc
        if i + 1 < len(path):
            die = _strip_typedefs(child.get_DIE_from_attribute("DW_AT_type"))
    return total


def _strip_typedefs(die: object) -> object:
    while die.tag in ("DW_TAG_typedef", "DW_TAG_volatile_type",  # type: ignore[attr-defined]
                      "DW_TAG_const_type"):
        die = die.get_DIE_from_attribute("DW_AT_type")  # type: ignore[attr-defined]
    return die
