"""A running CPython process: which object holds its interpreter, where that is
loaded, where its GIL is and whether it is on.

The files are read by otel_gil/target/interpreter.py (cached per build); here
the process's own state, from /proc (otel_gil/target/procfs.py): its maps, the
load bias, libc's pthread_cond_signal, and the GIL's address read from its
memory. Nothing here runs the target's Python.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from dataclasses import dataclass

from otel_gil.errors import (
    GilDisabledError,
    NotPythonError,
    TargetError,
    TargetGone,
    TargetNotReady,
)
from otel_gil.target import procfs
from otel_gil.target.elf import ElfObject
from otel_gil.target.interpreter import Interpreter, clear_caches, file_identity, inspect_binary
from otel_gil.target.layout import GilLayout
from otel_gil.target.paths import LIBPYTHON_RE, MUSL_RE, MUSL_REMEDY
from otel_gil.target.procfs import ROOT_REMEDY
from otel_gil.trust import printable

# Per file (by identity): its PT_LOAD segments, and libc's pthread_cond_signal.
_SEGMENTS: dict[tuple[int, int, int, int], list[tuple[int, int, int]]] = {}
_COND_SIGNAL: dict[tuple[int, int, int, int], int | None] = {}


def clear_memory_cache() -> None:
    """Forget every inspection kept in memory: builds, and per-file reads."""
    clear_caches()
    _SEGMENTS.clear()
    _COND_SIGNAL.clear()


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


_LIBC_RE = re.compile(r"^(libpthread\.so\.0|libc\.so\.6)$")


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
        if not isinstance(err, TargetGone) and procfs.exiting(pid):
            raise TargetGone(f"pid {pid} exited while it was being inspected") from err
        if isinstance(err, PermissionError):
            raise TargetError(f"cannot read {err.filename}", remedy=ROOT_REMEDY) from err
        if isinstance(err, OSError):
            raise TargetError(f"cannot read {err.filename}: {err.strerror}") from err
        raise


def _inspect_process(pid: int) -> Target:
    proc = f"/proc/{pid}"
    status = procfs.read(pid, "status")
    comm = printable(procfs.read(pid, "comm").strip())  # the process names itself
    nspid = procfs.nspid_of(status) or (pid,)
    maps = procfs.maps(pid)
    root = f"{proc}/root"
    _refuse_musl(pid, comm, maps)
    lib = [m for m in maps if LIBPYTHON_RE.match(os.path.basename(m.path))]
    exe = lib[0].path if lib else procfs.exe_path(pid)
    chosen = [m for m in maps if m.path == exe]
    if not chosen:
        raise NotPythonError(f"pid {pid} ({comm}) is not a Python process: no libpython3.X "
                             "is mapped into it, nor is its executable", remedy=NOT_PYTHON_REMEDY)
    object_path = procfs.open_path(pid, chosen[0])
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


def _refuse_musl(pid: int, comm: str, maps: list[procfs.Mapping]) -> None:
    """musl's condition variables are not glibc's: the release probe (glibc's
    pthread_cond_signal, and its filter on __condvar_cancel_waiting) has no
    counterpart there that was checked, so a musl process is refused by name."""
    musl = next((m.path for m in maps if MUSL_RE.search(m.path)), None)
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


def _load_bias(path: str, maps: list[procfs.Mapping]) -> int:
    """runtime address - link-time address, from the file's first mapping."""
    first = min(maps, key=lambda m: m.offset)
    key = file_identity(path)
    if key not in _SEGMENTS:
        with ElfObject(path) as obj:
            _SEGMENTS[key] = obj.load_segments()
    for p_offset, p_vaddr, _size in _SEGMENTS[key]:
        page = p_offset & ~0xFFF
        if page == first.offset:
            return first.start - (p_vaddr - (p_offset - page))
    raise TargetError(f"{path}: no PT_LOAD matches its first mapping at offset {first.offset:#x}")


def _cond_signal(pid: int, maps: list[procfs.Mapping]) -> tuple[str, int]:
    """The target's libc (or old-glibc libpthread) and its default pthread_cond_signal."""
    seen = []
    for m in maps:
        if m.path in seen or not _LIBC_RE.match(os.path.basename(m.path)):
            continue
        seen.append(m.path)
        path = procfs.open_path(pid, m)
        key = file_identity(path)
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
    with procfs.Memory(pid) as mem:
        return _walk_to_gil(mem, pid, layout, interp.runtime_address + bias)


def _peek(mem: procfs.Memory, address: int, fmt: str) -> int:
    return int(struct.unpack(fmt, mem.read(address, struct.calcsize(fmt)))[0])


def _walk_to_gil(mem: procfs.Memory, pid: int, layout: GilLayout, runtime: int) -> GilAddress:
    if layout.inline_offset is not None:
        gil = runtime + layout.inline_offset
    else:
        assert layout.interp_offset is not None and layout.gil_pointer_offset is not None
        interp = _peek(mem, runtime + layout.interp_offset, "<Q")
        if layout.interp_next is not None and layout.interp_id is not None:
            # 3.13+: interpreters.head is the newest; the main one has id 0.
            for _ in range(256):
                if not interp or _peek(mem, interp + layout.interp_id, "<q") == 0:
                    break
                interp = _peek(mem, interp + layout.interp_next, "<Q")
        if not interp:
            raise TargetNotReady(f"pid {pid}: the interpreter is not initialised yet "
                              "(no main interpreter in _PyRuntime), so it has no GIL",
                              remedy=NOT_YET_REMEDY)
        gil = _peek(mem, interp + layout.gil_pointer_offset, "<Q")
        if not gil:
            raise TargetNotReady(f"pid {pid}: the GIL is not created yet (interp->ceval.gil "
                              "is NULL)", remedy=NOT_YET_REMEDY)
    interval = _peek(mem, gil + layout.interval, "<Q")
    locked = _peek(mem, gil + layout.locked, "<i")
    if layout.inline_offset is not None and (locked, interval) == (0, 0):
        # 3.8 to 3.11: _PyRuntime is all zeros until _PyRuntime_Initialize()
        # sets interval (5000 µs) and locked (-1) in _gil_initialize().
        raise TargetNotReady(f"pid {pid}: the interpreter is not initialised yet (its GIL, "
                             "inline in _PyRuntime, is all zeros)", remedy=NOT_YET_REMEDY)
    if locked == -1:  # -1 until create_gil() (Python/ceval_gil.c _gil_initialize)
        raise TargetNotReady(f"pid {pid}: the GIL is not created yet (gil->locked is -1)",
                          remedy=NOT_YET_REMEDY)
    enabled_count = None
    if layout.enabled is not None:
        enabled_count = _peek(mem, gil + layout.enabled, "<i")
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
    data = procfs.peek_memory(target.pid, target.gil.address + layout.enabled, 4)
    return int(struct.unpack("<i", data)[0]) if len(data) == 4 else None
