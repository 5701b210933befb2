"""Target discovery: which ELF object holds CPython, where take_gil is, where the GIL is.

Nothing here runs the target's Python: versions, symbols and struct layouts are
read from the files (``inspect_binary``) and the GIL address from process memory
(``inspect_process``). Results per interpreter build are cached by build-id, in
memory and as JSON under ``$XDG_CACHE_HOME/otel-gil/interpreters``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

from otel_gil import trust
from otel_gil.disasm import (
    Function,
    ProbeSites,
    Site,
    analyse_function,
    first_local_branch,
    probe_sites,
)
from otel_gil.elfsyms import (
    ElfObject,
    Symbol,
    debug_file_candidates,
    gil_symbols,
    minidebuginfo,
)
from otel_gil.errors import (
    GilDisabledError,
    NotPythonError,
    TargetError,
    TargetGone,
    TargetNotReady,
)
from otel_gil.layout import (
    SUPPORTED,
    GilLayout,
    debug_offsets_layout,
    dwarf_gil_fields,
    dwarf_layout,
    is_free_threaded,
    read_debug_offsets,
    read_version,
    supported_range,
    table_layout,
)

CACHE_FORMAT = 4  # 2: keyed by build-id and symbol table; no pid-specific paths; 3: probe sites;
# 4: 3.15's PyThreadState thread ids at their debug-offsets index
FALLBACK_SOURCE = "no symbols: call target of PyEval_AcquireLock (capstone)"
ROOT_REMEDY = "run as root (reading another process's maps and memory needs CAP_SYS_PTRACE)"


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


# _PyEval_EnableGILPermanent() stores INT_MAX (3.13+ Python/ceval_gil.c); so does
# start-up with PYTHON_GIL=1. Anything between 0 and INT_MAX is transient: the
# GIL is on while an extension of unknown safety initialises, then either
# switched off again or made permanent.
GIL_ENABLED_PERMANENTLY = 2**31 - 1


@dataclass(frozen=True)
class GilAddress:
    address: int
    cond_address: int
    interval_us: int
    enabled: bool | None  # None: a default build; else whether it is on for good
    how: str
    enabled_count: int | None = None  # the raw _gil_runtime_state.enabled
    # What switched the GIL off for good at start-up ("PYTHON_GIL=0", "-X gil=0"):
    # then nothing can enable it later (3.13+ _PyEval_EnableGILTransient checks
    # config->enable_gil); empty when it may still be enabled.
    disabled_by: str = ""


@dataclass(frozen=True)
class Target:
    pid: int
    nspid: tuple[int, ...]
    root: str
    object_path: str
    interpreter: Interpreter
    load_bias: int
    pidns: tuple[int, int]
    gil: GilAddress
    cond_signal: tuple[str, int]


# ----------------------------------------------------------------- inspect_binary

_MEMORY_CACHE: dict[str, Interpreter] = {}


def inspect_binary(path: str, root: str = "/", cache: bool = True) -> Interpreter:
    """Read an interpreter ELF (libpython or exe). ``root``: where its /usr/lib/debug is.

    ``cache=False`` ignores (and does not fill) the build-id caches, for
    callers that must see how this very file resolves (tests of stripped copies).
    """
    if cache:
        known = _BUILD_IDS.get(_identity(path))
        if known is not None and known in _MEMORY_CACHE:
            return dataclasses.replace(_MEMORY_CACHE[known], path=path)
    with _open_elf(path) as obj:
        build_id = obj.build_id()
        if build_id and obj.elf.get_section_by_name(".symtab") is None:
            # A stripped copy keeps its original's build-id but resolves
            # differently (no symbol table): cache it apart.
            build_id += "-nosymtab"
        if build_id:
            _BUILD_IDS[_identity(path)] = build_id
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


def _open_elf(path: str) -> ElfObject:
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


def clear_memory_cache() -> None:
    for table in (_MEMORY_CACHE, _BUILD_IDS, _SEGMENTS, _COND_SIGNAL):
        table.clear()


# What a file is, cheaply: re-reading ELF headers of a big libpython for every
# process of the same build is what made the 50th inspect_process cost 20 ms.
_Identity = Tuple[int, int, int, int]
_BUILD_IDS: dict[_Identity, str] = {}
_SEGMENTS: dict[_Identity, list[tuple[int, int, int]]] = {}
_COND_SIGNAL: dict[_Identity, int | None] = {}


def _identity(path: str) -> _Identity:
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


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "otel-gil", "interpreters")


def _cache_file(build_id: str) -> str:
    return os.path.join(cache_dir(), f"{build_id}.json")


def _trusted_cache() -> bool:
    """The cache says where to put uprobes in other processes: a root sidecar
    uses it only where no other user could have written it (otel_gil.trust)."""
    return trust.untrusted_reason(cache_dir()) is None


def _disk_store(build_id: str, interp: Interpreter) -> None:
    directory = cache_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _trusted_cache():
            return
        payload = {"format": CACHE_FORMAT, "interpreter": dataclasses.asdict(interp)}
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, _cache_file(build_id))  # atomic: readers never see half a file
    except OSError:
        pass  # a read-only home only costs a re-read next time


def _disk_load(build_id: str) -> Interpreter | None:
    if not _trusted_cache():
        return None
    try:
        with open(_cache_file(build_id)) as f:
            payload = json.load(f)
        if payload.get("format") != CACHE_FORMAT:
            return None
        return _interpreter_from_json(payload["interpreter"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or corrupt: inspect again and overwrite


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


# ----------------------------------------------------------------- inspect_process

# ABI flags in the name: t free-threaded (3.13+), d debug, m pymalloc (up to 3.7).
_LIBPYTHON_RE = re.compile(r"^libpython3\.\d+[tdm]*\.so")
_LIBC_RE = re.compile(r"^(libpthread\.so\.0|libc\.so\.6)$")


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    offset: int
    inode: int
    path: str


def inspect_process(pid: int) -> Target:
    """Everything the probes need about a running CPython process (host pid).

    Raises TargetNotReady while the process is not (yet) a running interpreter
    and TargetGone once it is exiting: a process that exits while it is read
    makes its /proc entries fail one by one (exe, root and maps need its memory
    map, which do_exit() drops before the process becomes a zombie), and
    whichever read fails first must not decide what the caller is told.
    """
    try:
        return _inspect_process(pid)
    except (TargetError, OSError) as err:
        if not isinstance(err, TargetGone) and exiting(pid):
            raise TargetGone(f"pid {pid} exited while it was being inspected") from err
        if isinstance(err, PermissionError):
            raise TargetError(f"cannot read {err.filename}", remedy=ROOT_REMEDY) from err
        if isinstance(err, OSError):
            raise TargetError(f"cannot read {err.filename}: {err.strerror}") from err
        raise


# include/linux/sched.h: set by do_exit() (exit_signals()) before exit_mm() unmaps
# the process's memory, so a process still listed but past this point is going.
PF_EXITING = 0x00000004


def exiting(pid: int) -> bool:
    """True when pid is gone, a zombie, or its thread-group leader is exiting
    (state and flags, fields 3 and 9 of /proc/PID/stat, proc(5))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):
        return True


def _inspect_process(pid: int) -> Target:
    proc = f"/proc/{pid}"
    status = _read_proc(pid, "status")
    comm = _read_proc(pid, "comm").strip()
    nspid = tuple(int(x) for x in _status_field(status, "NSpid").split()) or (pid,)
    maps = _read_maps(pid)
    root = f"{proc}/root"
    _refuse_musl(pid, comm, maps)
    lib = [m for m in maps if _LIBPYTHON_RE.match(os.path.basename(m.path))]
    exe = lib[0].path if lib else _exe_path(pid)
    chosen = [m for m in maps if m.path == exe]
    if not chosen:
        raise NotPythonError(f"pid {pid} ({comm}) is not a Python process: no libpython3.X "
                             "is mapped into it, nor is its executable", remedy=NOT_PYTHON_REMEDY)
    object_path = _open_path(pid, chosen[0])
    try:
        interp = inspect_binary(object_path, root=root)
    except NotPythonError as err:
        raise NotPythonError(
            f"pid {pid} ({comm}) is not a Python process: no libpython3.X is mapped into it, "
            f"and {exe} holds no CPython (no _PyRuntime)",
            remedy=NOT_PYTHON_REMEDY) from err
    except TargetError as err:
        # Say which process; the file's own message says which check failed,
        # with the file named as the process sees it, not through /proc/PID/root.
        # Without a libpython it may be a launcher (pyenv's) before ld.so has
        # mapped libpython: not ready, rather than not Python.
        text = str(err.args[0]).replace(object_path, chosen[0].path)
        kind = TargetError if lib else TargetNotReady
        raise kind(f"pid {pid} ({comm}): {text}", remedy=err.remedy) from err
    bias = _load_bias(object_path, chosen)
    libc = _cond_signal(pid, maps)
    ns = os.stat(f"{proc}/ns/pid")
    gil = _read_gil(pid, interp, bias)
    if gil.enabled is False:
        gil = dataclasses.replace(gil, disabled_by=_gil_disabled_by(pid))
    return Target(pid, nspid, root, object_path, interp, bias, (ns.st_dev, ns.st_ino), gil, libc)


def _gil_disabled_by(pid: int) -> str:
    """"PYTHON_GIL=0" or "-X gil=0" when the process was started so (both are
    read once, at start-up: Python/initconfig.c config_read_gil), else ""."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return ""
    option, ignore_env = x_gil_option(argv)  # the command line wins over the environment
    if option is not None:
        return "-X gil=0" if option == b"0" else ""
    return "PYTHON_GIL=0" if not ignore_env and b"PYTHON_GIL=0" in environ else ""


def x_gil_option(argv: list[bytes]) -> tuple[bytes | None, bool]:
    """(the value of ``-X gil=V``, whether -E or -I makes the interpreter ignore
    PYTHON_* variables), from its own options, which come before the program
    (-c, -m, -, or a script); the last -X gil wins."""
    found = None
    ignore_env = False
    i = 1
    while i < len(argv) and argv[i].startswith(b"-") and argv[i] not in (b"-c", b"-m", b"-"):
        option = argv[i]
        if option in (b"-X", b"-W") and i + 1 < len(argv):  # their value may stand apart
            i += 1
            option += argv[i]
        if option.startswith(b"-Xgil="):
            found = option[len(b"-Xgil="):]
        elif not option.startswith((b"-X", b"-W", b"--")) and set(option[1:]) & set(b"EI"):
            ignore_env = True  # -E, -I, or flags combined as in -IB
        i += 1
    return found, ignore_env


NOT_YET_REMEDY = ("attach once Py_Initialize() has run; `otel-gil run` and "
                  "otel_gil.instrument() wait for that themselves")
NOT_PYTHON_REMEDY = "give the pid of a CPython 3.8 to 3.15 process"
MUSL_REMEDY = ("run the app on a glibc-based image (Debian, Ubuntu, Fedora, RHEL, "
               "python:*-slim), not Alpine")
# Alpine maps /lib/ld-musl-ARCH.so.1 (libc.musl-ARCH.so.1 links to it); Debian's
# musl package maps /usr/lib/ARCH-linux-musl/libc.so, its loader's target.
_MUSL_RE = re.compile(r"(^|/)(ld-musl-[^/]*\.so\.1|libc\.musl-[^/]*\.so\.1)$|-linux-musl/libc\.so$")


def _exe_path(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe").replace(" (deleted)", "")
    except FileNotFoundError as err:
        raise TargetError(f"no process with pid {pid}") from err
    except PermissionError as err:
        raise TargetError(f"cannot read /proc/{pid}/exe", remedy=ROOT_REMEDY) from err


def _refuse_musl(pid: int, comm: str, maps: list[_Mapping]) -> None:
    """musl's condition variables are not glibc's: the release probe (glibc's
    pthread_cond_signal, and its filter on __condvar_cancel_waiting) has no
    counterpart there that was checked, so a musl process is refused by name."""
    musl = next((m.path for m in maps if _MUSL_RE.search(m.path)), None)
    if musl is not None:
        raise TargetError(f"pid {pid} ({comm}) runs on musl libc ({musl}): otel-gil "
                          "supports glibc only", remedy=MUSL_REMEDY)


GIL_DISABLED_REMEDY = ("run with PYTHON_GIL=1 to measure the GIL; `otel-gil record` and the "
                       "sidecar keep watching and trace from the moment it is enabled")


def gil_state(enabled_count: int | None) -> str:
    """A free-threaded target's _gil_runtime_state.enabled, in words."""
    if enabled_count is None:
        return "GIL always on (not a free-threaded build)"
    if enabled_count == GIL_ENABLED_PERMANENTLY:
        return "GIL enabled"
    if enabled_count:
        return (f"GIL enabled only transiently ({enabled_count} request(s): an extension "
                "module is being initialised)")
    return "GIL disabled"


def require_gil(target: Target, watch: bool = False) -> None:
    """Raise if the target is free-threaded and its GIL is not on for good;
    with ``watch``, only if it cannot be switched on later either."""
    gil = target.gil
    if gil.enabled is not False:
        return
    if gil.disabled_by:
        raise GilDisabledError(f"GIL disabled by {gil.disabled_by}: nothing to measure",
                               remedy="run with PYTHON_GIL=1 to measure the GIL")
    if not watch:
        raise GilDisabledError(f"{gil_state(gil.enabled_count or 0)}: nothing to measure",
                               remedy=GIL_DISABLED_REMEDY)


def _read_proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise TargetGone(f"no process with pid {pid}") from err
    except PermissionError as err:
        raise TargetError(f"cannot read /proc/{pid}/{name}", remedy=ROOT_REMEDY) from err


def _status_field(status: str, key: str) -> str:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1]
    return ""


def _read_maps(pid: int) -> list[_Mapping]:
    out = []
    for line in _read_proc(pid, "maps").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        lo, hi = parts[0].split("-")
        path = parts[5].replace(" (deleted)", "")
        out.append(_Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), int(parts[4]), path))
    return out


def _open_path(pid: int, m: _Mapping) -> str:
    """A path that opens the mapped file from here, checked by inode.

    Through /proc/PID/root for a container or chroot whose maps show paths as
    the target sees them; as printed, when the target is chrooted under a
    directory we can see (maps print paths relative to *our* root then); last,
    /proc/PID/map_files, which works across mount namespaces (root only).
    """
    candidates = (f"/proc/{pid}/root{m.path}", m.path,
                  f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}")
    for path in candidates:
        try:
            if os.stat(path).st_ino == m.inode:
                return path
        except OSError:
            continue
    raise TargetError(f"cannot open {m.path} of pid {pid}", remedy=ROOT_REMEDY)


def _load_bias(path: str, maps: list[_Mapping]) -> int:
    """runtime address - link-time address, from the file's first mapping."""
    first = min(maps, key=lambda m: m.offset)
    key = _identity(path)
    if key not in _SEGMENTS:
        with ElfObject(path) as obj:
            _SEGMENTS[key] = obj.load_segments()
    for p_offset, p_vaddr, _size in _SEGMENTS[key]:
        page = p_offset & ~0xFFF
        if page == first.offset:
            return first.start - (p_vaddr - (p_offset - page))
    raise TargetError(f"{path}: no PT_LOAD matches its first mapping at offset {first.offset:#x}")


def _cond_signal(pid: int, maps: list[_Mapping]) -> tuple[str, int]:
    """The target's libc (or old-glibc libpthread) and its default pthread_cond_signal."""
    seen = []
    for m in maps:
        if m.path in seen or not _LIBC_RE.match(os.path.basename(m.path)):
            continue
        seen.append(m.path)
        path = _open_path(pid, m)
        key = _identity(path)
        if key not in _COND_SIGNAL:
            with ElfObject(path) as obj:
                found = obj.versioned_dynsym("pthread_cond_signal")
            _COND_SIGNAL[key] = found[0].value if found is not None else None
        address = _COND_SIGNAL[key]
        if address is not None:
            return path, address
    # Before ld.so has mapped libc (it maps the program's DT_NEEDED in order).
    raise TargetNotReady(f"pid {pid}: no libc with pthread_cond_signal is mapped")


def _read_gil(pid: int, interp: Interpreter, bias: int) -> GilAddress:
    layout = interp.gil_layout
    if layout is None or interp.runtime_address is None:
        raise TargetError(f"{interp.path}: no _PyRuntime, so the GIL cannot be located")
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except PermissionError as err:
        raise TargetError(f"cannot read the memory of pid {pid}", remedy=ROOT_REMEDY) from err
    except FileNotFoundError as err:
        raise TargetGone(f"no process with pid {pid}") from err
    try:
        return _walk_to_gil(fd, pid, layout, interp.runtime_address + bias)
    finally:
        os.close(fd)


def _peek(fd: int, pid: int, address: int, fmt: str) -> int:
    size = struct.calcsize(fmt)
    try:
        data = os.pread(fd, size, address)
    except OSError as err:
        raise TargetError(f"pid {pid}: cannot read {size} bytes at {address:#x}: {err}") from err
    if len(data) != size:
        raise TargetError(f"pid {pid}: short read at {address:#x}")
    return int(struct.unpack(fmt, data)[0])


def _walk_to_gil(fd: int, pid: int, layout: GilLayout, runtime: int) -> GilAddress:
    if layout.inline_offset is not None:
        gil = runtime + layout.inline_offset
    else:
        assert layout.interp_offset is not None and layout.gil_pointer_offset is not None
        interp = _peek(fd, pid, runtime + layout.interp_offset, "<Q")
        if layout.interp_next is not None and layout.interp_id is not None:
            # 3.13+: interpreters.head is the newest; the main one has id 0.
            for _ in range(256):
                if not interp or _peek(fd, pid, interp + layout.interp_id, "<q") == 0:
                    break
                interp = _peek(fd, pid, interp + layout.interp_next, "<Q")
        if not interp:
            raise TargetNotReady(f"pid {pid}: the interpreter is not initialised yet "
                              "(no main interpreter in _PyRuntime), so it has no GIL",
                              remedy=NOT_YET_REMEDY)
        gil = _peek(fd, pid, interp + layout.gil_pointer_offset, "<Q")
        if not gil:
            raise TargetNotReady(f"pid {pid}: the GIL is not created yet (interp->ceval.gil "
                              "is NULL)", remedy=NOT_YET_REMEDY)
    interval = _peek(fd, pid, gil + layout.interval, "<Q")
    locked = _peek(fd, pid, gil + layout.locked, "<i")
    if layout.inline_offset is not None and (locked, interval) == (0, 0):
        # 3.8 to 3.11: _PyRuntime is all zeros until _PyRuntime_Initialize()
        # sets interval (5000 µs) and locked (-1) in _gil_initialize().
        raise TargetError(f"pid {pid}: the interpreter is not initialised yet (its GIL, "
                          "inline in _PyRuntime, is all zeros)", remedy=NOT_YET_REMEDY)
    if locked == -1:  # -1 until create_gil() (Python/ceval_gil.c _gil_initialize)
        raise TargetNotReady(f"pid {pid}: the GIL is not created yet (gil->locked is -1)",
                          remedy=NOT_YET_REMEDY)
    enabled_count = None
    if layout.enabled is not None:
        enabled_count = _peek(fd, pid, gil + layout.enabled, "<i")
    # sys.setswitchinterval() accepts any positive float; 5000 µs is the default.
    if locked not in (0, 1) or not 0 < interval <= 10**9:
        raise TargetNotReady(
            f"pid {pid}: the GIL read at {gil:#x} ({layout.how}) looks wrong "
            f"(locked={locked}, interval={interval}); is the interpreter still starting?"
        )
    enabled = None if enabled_count is None else enabled_count == GIL_ENABLED_PERMANENTLY
    return GilAddress(gil, gil + layout.cond, interval, enabled, layout.how, enabled_count)


def gil_enabled_count(target: Target) -> int | None:
    """``_gil_runtime_state.enabled`` now (free-threaded builds; None otherwise,
    or when the process is gone): 0 disabled, INT_MAX enabled for good, else
    the count of transient requests (an extension's init, Python/import.c)."""
    layout = target.interpreter.gil_layout
    if layout is None or layout.enabled is None:
        return None
    try:
        fd = os.open(f"/proc/{target.pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 4, target.gil.address + layout.enabled)
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(struct.unpack("<i", data)[0]) if len(data) == 4 else None


# ----------------------------------------------------------------- interpreter paths

# Where ld.so looks last (ld.so(8), Debian's multiarch layout first); the
# /etc/ld.so.cache is not read: a libpython outside these is found via RUNPATH.
_DEFAULT_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64",
                     "lib", "usr/lib", "usr/local/lib")


def filesystem_root(path: str) -> str:
    """The root of the file tree holding ``path``: the nearest ancestor with its
    own usr/lib (a chroot tree, a container's rootfs), else "/". Its
    usr/lib/debug is where the program's debug files are."""
    d = os.path.dirname(os.path.abspath(path))
    while d != "/":
        if os.path.isdir(os.path.join(d, "usr", "lib")):
            return d
        d = os.path.dirname(d)
    return "/"


def interpreter_object(path: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(the ELF object holding the interpreter, its filesystem root) for a python program.

    A launcher built with --enable-shared (pyenv's bin/python3.X) holds no
    interpreter: its DT_NEEDED libpython is found as ld.so(8) would, DT_RPATH
    (only without DT_RUNPATH), LD_LIBRARY_PATH from ``env``, DT_RUNPATH, then
    the default directories, all inside the program's root.
    """
    root = filesystem_root(path)
    with _open_elf(path) as obj:
        needed, rpath, runpath = _dynamic_tags(obj)
        loader = obj.program_interpreter()
    musl = next((n for n in [loader or "", *needed] if _MUSL_RE.search(n)), None)
    if musl is not None:
        raise TargetError(f"{path} is linked against musl libc ({musl}): otel-gil supports "
                          "glibc only", remedy=MUSL_REMEDY)
    lib = next((n for n in needed if _LIBPYTHON_RE.match(n)), None)
    if lib is None:
        return path, root  # the interpreter is linked in (Debian's /usr/bin/python3.X)
    env_path = (env or {}).get("LD_LIBRARY_PATH", "")
    dirs = ([] if runpath else rpath) + env_path.split(":") + runpath + list(_DEFAULT_LIB_DIRS)
    origin = os.path.dirname(os.path.abspath(path))
    searched = []
    for d in filter(None, dirs):
        if "$ORIGIN" in d or "${ORIGIN}" in d:
            host_dir = d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        else:
            host_dir = os.path.join(root, d.lstrip("/"))
        searched.append(host_dir)
        if os.path.isfile(os.path.join(host_dir, lib)):
            return os.path.join(host_dir, lib), root
    raise TargetError(f"{path} needs {lib}, found in none of {', '.join(searched)}",
                      remedy="set LD_LIBRARY_PATH as the program runs with, or give its pid")


def _dynamic_tags(obj: ElfObject) -> tuple[list[str], list[str], list[str]]:
    """(DT_NEEDED names, DT_RPATH dirs, DT_RUNPATH dirs)."""
    needed: list[str] = []
    rpath: list[str] = []
    runpath: list[str] = []
    dynamic = obj.elf.get_section_by_name(".dynamic")
    for tag in dynamic.iter_tags() if dynamic is not None else ():  # type: ignore[attr-defined]
        kind = tag.entry.d_tag
        if kind == "DT_NEEDED":
            needed.append(tag.needed)
        elif kind == "DT_RPATH":
            rpath += tag.rpath.split(":")
        elif kind == "DT_RUNPATH":
            runpath += tag.runpath.split(":")
    return needed, rpath, runpath
