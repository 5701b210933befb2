"""An interpreter build: which ELF object holds CPython, its version, where
take_gil is and where each probe goes, and its GIL struct's layout.

Nothing here runs the target's Python: versions, symbols and struct layouts are
read from the files (``inspect_binary``); a running process is
otel_gil/target/process.py's. Results per interpreter build are cached by
build-id, in memory and on disk (otel_gil/target/cache.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Tuple

from otel_gil.errors import (
    NotPythonError,
    TargetError,
)
from otel_gil.target import cache
from otel_gil.target.disasm import Function, analyse_function, first_local_branch
from otel_gil.target.dwarf import dwarf_gil_fields, dwarf_layout
from otel_gil.target.elf import (
    ElfObject,
    Symbol,
    debug_file_candidates,
    gil_symbols,
    minidebuginfo,
)
from otel_gil.target.layout import (
    SUPPORTED,
    GilLayout,
    debug_offsets_layout,
    is_free_threaded,
    read_debug_offsets,
    read_version,
    supported_range,
    table_layout,
)
from otel_gil.target.procfs import ROOT_REMEDY
from otel_gil.target.sites import ProbeSites, Site, probe_sites

FALLBACK_SOURCE = "no symbols: call target of PyEval_AcquireLock (capstone)"


@dataclass(frozen=True)
class Interpreter:
    """One ELF object holding CPython (a libpython, or a statically linked exe)."""

    path: str
    build_id: str | None
    version: tuple[int, int, int]
    free_threaded: bool
    static: bool
    take_gil: tuple[Function, ...]
    drop_gil: tuple[Function, ...]
    runtime_address: int | None
    symbol_source: str
    gil_layout: GilLayout | None = None
    # Why the result is not vouched for (a version newer than the known ones,
    # its GIL found through _Py_DebugOffsets alone); empty when it is.
    unverified: str = ""
    sites: ProbeSites | None = None  # where each probe set's probes go (disasm.probe_sites)


# ----------------------------------------------------------------- inspect_binary

_MEMORY_CACHE: dict[str, Interpreter] = {}


def inspect_binary(path: str, root: str = "/", cache: bool = True) -> Interpreter:
    """Read an interpreter ELF (libpython or exe). ``root``: where its /usr/lib/debug is.

    ``cache=False`` ignores (and does not fill) the build-id caches, for
    callers that must see how this very file resolves (tests of stripped copies).
    """
    if cache:
        known = _BUILD_IDS.get(file_identity(path))
        if known is not None and known in _MEMORY_CACHE:
            return dataclasses.replace(_MEMORY_CACHE[known], path=path)
    with open_elf(path) as obj:
        build_id = obj.build_id()
        if build_id and obj.elf.get_section_by_name(".symtab") is None:
            # A stripped copy keeps its original's build-id but resolves
            # differently (no symbol table): cache it apart.
            build_id += "-nosymtab"
        if build_id:
            _BUILD_IDS[file_identity(path)] = build_id
        if cache and build_id:
            hit = _MEMORY_CACHE.get(build_id) or _disk_load(build_id)
            if hit is not None:
                _MEMORY_CACHE[build_id] = hit
                return dataclasses.replace(hit, path=path)
        interp = _inspect(obj, root)
    if cache and build_id:
        _MEMORY_CACHE[build_id] = interp
        if interp.symbol_source != FALLBACK_SOURCE:
            # Not persisted: installing the debug symbols later must be noticed.
            _disk_store(build_id, interp)
    return interp


def open_elf(path: str) -> ElfObject:
    """Open an ELF file, or say in one line why it cannot be."""
    try:
        return ElfObject(path)
    except FileNotFoundError as err:
        raise TargetError(f"no such file: {path}") from err
    except PermissionError as err:
        raise TargetError(f"cannot read {path}", remedy=ROOT_REMEDY) from err
    except OSError as err:
        raise TargetError(f"cannot read {path}: {err.strerror}",
                          remedy="give the path of a python executable") from err


# What a file is, cheaply: re-reading ELF headers of a big libpython for every
# process of the same build is what made the 50th inspect_process cost 20 ms.
_Identity = Tuple[int, int, int, int]
_BUILD_IDS: dict[_Identity, str] = {}


def clear_caches() -> None:
    """Forget every inspection kept in memory (see process.clear_memory_cache)."""
    _MEMORY_CACHE.clear()
    _BUILD_IDS.clear()


def file_identity(path: str) -> _Identity:
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise TargetError(f"no such file: {path}") from err
    except PermissionError as err:
        raise TargetError(f"cannot read {path}", remedy=ROOT_REMEDY) from err
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _inspect(obj: ElfObject, root: str) -> Interpreter:
    runtime = _runtime_address(obj)
    if runtime is None and obj.lookup("Py_Initialize") is None:
        raise NotPythonError(f"{obj.path} holds no CPython interpreter (no _PyRuntime)",
                             remedy="give the path of a python3.X executable or libpython")
    version, _how = read_version(obj, runtime)
    unverified = _check_version(obj, runtime, version)
    free_threaded = is_free_threaded(obj, runtime)
    found = _find_gil_functions(obj, root)
    takes, drops, source, dwarf_obj, sites = found
    if not takes:
        raise TargetError(f"{obj.path}: take_gil not found ({source})")
    for fn in takes:
        if not fn.ret_addresses:
            raise TargetError(f"{obj.path}: {fn.name} at {fn.address:#x} has no ret instruction")
    try:
        layout = _gil_layout(obj, dwarf_obj, runtime, version, free_threaded, takes[0].address)
    finally:
        if dwarf_obj is not None and dwarf_obj is not obj:
            dwarf_obj.close()
    if unverified:
        fields = ("read from DWARF" if "DWARF" in layout.how
                  else f"assumed as in {SUPPORTED[1][0]}.{SUPPORTED[1][1]}")
        unverified += (f": unverified; the GIL was located through its _Py_DebugOffsets, its "
                       f"fields {fields}, take_gil found via {source}")
    return Interpreter(
        path=obj.path, build_id=obj.build_id(), version=version, free_threaded=free_threaded,
        static=obj.is_executable(), take_gil=tuple(takes), drop_gil=tuple(drops),
        runtime_address=runtime, symbol_source=source, gil_layout=layout, unverified=unverified,
        sites=sites,
    )


UPGRADE_REMEDY = ("upgrade otel-gil; if this is its newest release, report the interpreter "
                  "with the output of `otel-gil doctor --python PATH --json`")


def _check_version(obj: ElfObject, runtime: int | None, version: tuple[int, int, int]) -> str:
    """Raise for a version that cannot be traced; for one newer than the known
    ones whose ``_Py_DebugOffsets`` locate the GIL, return why it is unverified."""
    shown = ".".join(map(str, version))
    if version[:2] < SUPPORTED[0]:
        raise TargetError(
            f"{obj.path}: CPython {shown} is too old: otel-gil supports {supported_range()}",
            remedy="run the app on CPython 3.8 or newer",
        )
    if version[:2] <= SUPPORTED[1]:
        return ""
    why = _debug_offsets_problem(obj, runtime)
    if why:
        raise TargetError(
            f"{obj.path}: CPython {shown} is newer than this otel-gil knows "
            f"({supported_range()}), and {why}, so the GIL cannot be located",
            remedy=UPGRADE_REMEDY,
        )
    return f"CPython {shown} is newer than this otel-gil knows ({supported_range()})"


def _debug_offsets_problem(obj: ElfObject, runtime: int | None) -> str:
    """Why ``_Py_DebugOffsets`` cannot locate the GIL; empty when they can."""
    if runtime is None:
        return "it has neither a _PyRuntime symbol nor a .PyRuntime section"
    try:
        found = read_debug_offsets(obj, runtime)
    except TargetError:
        return ("its _Py_DebugOffsets have a layout this otel-gil does not know "
                "(no GIL fields that line up)")
    if found is None:
        return "its _PyRuntime does not start with _Py_DebugOffsets (no 'xdebugpy' cookie)"
    return ""


def _runtime_address(obj: ElfObject) -> int | None:
    sym = obj.lookup("_PyRuntime")
    if sym is not None:
        return sym.value
    section = obj.section_range(".PyRuntime")  # its own section since 3.10
    return section[0] if section else None


def _find_gil_functions(obj: ElfObject, root: str) -> tuple[
        list[Function], list[Function], str, ElfObject | None, ProbeSites | None]:
    """take_gil/drop_gil copies from the first symbol source that has them.

    Returns (takes, drops, source, object to read DWARF from or None, probe
    sites); the DWARF object is left open for the caller.
    """
    takes, drops, colds = gil_symbols(obj)
    if takes:
        found = _analyse(obj, takes, drops, colds, "symtab", obj)
        return found[:3] + (obj, found[3])
    mini = minidebuginfo(obj)
    if mini is not None:
        with mini:
            takes, drops, colds = gil_symbols(mini)
            if takes:
                found = _analyse(obj, takes, drops, colds, "minidebuginfo", mini)
                return found[:3] + (None, found[3])
    roots = tuple(dict.fromkeys((root, "/")))
    for debug_path, how in debug_file_candidates(obj, roots):
        debug = ElfObject(debug_path)
        takes, drops, colds = gil_symbols(debug)
        if takes:
            found = _analyse(obj, takes, drops, colds, how, debug)
            return found[:3] + (debug, found[3])
        debug.close()
    takes_fn, drops_fn, source = _fallback(obj)
    return takes_fn, drops_fn, source, None, _sites(obj, takes_fn, [], obj)


def _sites(obj: ElfObject, takes: list[Function], colds: list[Symbol],
           names: ElfObject) -> ProbeSites | None:
    """Probe sites, or None (today's probes) when the code cannot be read."""
    try:
        return probe_sites(obj, takes, colds, names)
    except (TargetError, ValueError, KeyError):
        return None


def _analyse(
    obj: ElfObject, takes: list[Symbol], drops: list[Symbol], colds: list[Symbol], source: str,
    names: ElfObject,
) -> tuple[list[Function], list[Function], str, ProbeSites | None]:
    def each(syms: list[Symbol]) -> list[Function]:
        return [analyse_function(obj, s.name, s.value, s.size, source, colds)
                for s in sorted(syms, key=lambda s: s.value)]

    takes_fn = each(takes)
    return takes_fn, each(drops), source, _sites(obj, takes_fn, colds, names)


def _fallback(obj: ElfObject) -> tuple[list[Function], list[Function], str]:
    """No symbols at all: PyEval_AcquireLock's first local branch is take_gil.

    The extent comes from the ``.eh_frame`` FDE, as there is no symbol size.
    Finds one copy only (3.8's eval-loop ``take_gil`` is not reached this way).
    """
    source = FALLBACK_SOURCE
    acquire = obj.lookup("PyEval_AcquireLock", (".dynsym",))
    if acquire is None:
        raise TargetError(f"{obj.path}: no symbols, and PyEval_AcquireLock is not exported")
    target = first_local_branch(obj, acquire)
    extent = obj.fde_extent(target) if target is not None else None
    if target is None or extent is None or extent[0] != target:
        raise TargetError(
            f"{obj.path} is stripped and take_gil could not be found from PyEval_AcquireLock",
            remedy="install the interpreter's debug symbols (e.g. python3.X-dbg)",
        )
    fn = analyse_function(obj, "take_gil", extent[0], extent[1], source, [])
    return [fn], [], source


def _gil_layout(
    obj: ElfObject, dwarf_obj: ElfObject | None, runtime: int | None,
    version: tuple[int, int, int], free_threaded: bool, take_gil: int,
) -> GilLayout:
    dbg = read_debug_offsets(obj, runtime) if runtime is not None else None
    if dbg is not None:
        fields = dwarf_gil_fields(dwarf_obj, take_gil) if dwarf_obj is not None else None
        return debug_offsets_layout(dbg, fields)
    if dwarf_obj is not None:
        found = dwarf_layout(dwarf_obj, take_gil, version)
        if found is not None:
            return found
    return table_layout(version, free_threaded)


# ----------------------------------------------------------------- disk cache


def _disk_store(build_id: str, interp: Interpreter) -> None:
    cache.store(build_id, dataclasses.asdict(interp))


def _disk_load(build_id: str) -> Interpreter | None:
    found = cache.load(build_id)
    try:
        return _interpreter_from_json(found) if found is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # corrupt: inspect again and overwrite


def _interpreter_from_json(d: dict[str, Any]) -> Interpreter:
    def fn(x: dict[str, Any]) -> Function:
        return Function(x["name"], int(x["address"]), int(x["size"]),
                        tuple(int(r) for r in x["ret_addresses"]), x["source"],
                        tuple(x["notes"]))

    layout = GilLayout(**d["gil_layout"]) if d.get("gil_layout") else None
    sites = None
    if d.get("sites"):
        raw = d["sites"]

        def each(key: str) -> tuple[Site, ...]:
            return tuple(Site(**x) for x in raw[key])

        sites = ProbeSites(each("held"), each("waits"), each("wakes"), each("releases"),
                           tuple(raw["notes"]))
    return Interpreter(
        path=d["path"], build_id=d["build_id"], version=tuple(d["version"]),
        free_threaded=bool(d["free_threaded"]), static=bool(d["static"]),
        take_gil=tuple(fn(x) for x in d["take_gil"]), drop_gil=tuple(fn(x) for x in d["drop_gil"]),
        runtime_address=d["runtime_address"], symbol_source=d["symbol_source"], gil_layout=layout,
        unverified=str(d.get("unverified", "")),
        sites=sites,
    )
