"""The GIL's layout from DWARF: the compilation unit that defines take_gil
(found through ``.debug_aranges``, never the whole of a libpython's DWARF)
gives struct _gil_runtime_state's fields, where _PyRuntime keeps the GIL (or
the pointer to it), and PyThreadState's thread ids (pyelftools)."""

from __future__ import annotations

from typing import Any

from otel_gil.target.elf import ElfObject
from otel_gil.target.layout import GilLayout, Version


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
