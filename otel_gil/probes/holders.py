"""What the probes are told about a target (struct target of bpf/gil.h), and how
they name the GIL's holder: which word of its PyThreadState holds its tid,
checked on the live process."""

from __future__ import annotations

import ctypes
import os
import struct
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from otel_gil.abi import events
from otel_gil.abi.slots import TableLocation
from otel_gil.errors import TargetError
from otel_gil.target import procfs
from otel_gil.target.elf import ElfObject

if TYPE_CHECKING:
    from otel_gil.target.process import Target


_PTHREAD_TID: Dict[Tuple[int, int, int], Optional[int]] = {}


def glibc_tid_offset(libc_path: str) -> Optional[int]:
    """Offset of the tid in glibc's struct pthread, from libc's own descriptor
    for libthread_db (`_thread_db_pthread_tid`: bit size, count, offset; glibc
    nptl_db/structs.def). None for a libc without it."""
    try:
        st = os.stat(libc_path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _PTHREAD_TID:
        found = None
        try:
            with ElfObject(libc_path) as libc:
                sym = libc.lookup("_thread_db_pthread_tid", (".dynsym",))
                if sym is not None:
                    bits, count, offset = struct.unpack("<III", libc.read(sym.value, 12))
                    found = offset if (bits, count) == (32, 1) and offset < 4096 else None
        except (OSError, TargetError, struct.error):
            found = None
        _PTHREAD_TID[key] = found
    return _PTHREAD_TID[key]


def target_config(target: Target, ctx_table: Optional[TableLocation]) -> events.TargetState:
    """What the probes need to know about a target (struct target's configuration)."""
    cfg = events.TargetState()
    cfg.cond_addr = target.gil.cond_address
    cfg.interval_ns = target.gil.interval_us * 1000
    if ctx_table is not None:
        cfg.ctx_table = ctx_table.address
        cfg.ctx_slots = ctx_table.slots
    if len(target.nspid) > 1:
        cfg.ns_translate = 1
        cfg.ns_dev, cfg.ns_ino = target.pidns
    layout = target.interpreter.gil_layout
    cfg.gil_addr = target.gil.address
    if layout is not None:
        # last_holder and switch_number sit on either side of locked in struct
        # _gil_runtime_state, 3.8 to 3.14 (Include/internal/pycore_gil.h;
        # checked with gdb on every build here, free-threaded included).
        cfg.off_locked = layout.locked
        cfg.off_holder = layout.locked - 8
        cfg.off_switch = layout.locked + 8
        cfg.tid_how, cfg.off_tid, cfg.off_pthread_tid = holder_tid_source(target)
    cfg.holder_tid = 0
    return cfg


def stack_config(cfg: events.TargetState, target: Target) -> None:
    """Holder stacks' part of struct target: on, and where the frames are."""
    from otel_gil.stacks.store import frame_layout  # noqa: PLC0415

    cfg.stacks = 1 if cfg.tid_how else 0  # a holder is known by its tstate's tid
    layout = frame_layout(target)
    if layout is None:
        cfg.off_frame = cfg.off_frame2 = events.GIL_NO_OFFSET
        return
    cfg.off_frame, cfg.off_frame2 = layout.off_frame, layout.off_frame2
    cfg.off_prev, cfg.off_code, cfg.off_instr = layout.off_prev, layout.off_code, layout.off_instr


def holder_tid_source(target: Target) -> Tuple[int, int, int]:
    """(GIL_TID_*, offset in PyThreadState, glibc's tid offset) to name a holder
    from gil->last_holder, checked on the live process; (0, 0, 0) if unknown.

    The layout's offset (DWARF, _Py_DebugOffsets, table) is tried first; the
    check is that the last holder's PyThreadState gives one of the process's
    thread ids. Where it does not (a build whose layout is not known right),
    the first 1 KiB of that PyThreadState is searched for a word that does
    (native_thread_id is the kernel tid, 3.11+). Data read from the process is
    untrusted: only a tid of the process's own threads is ever accepted.
    """
    layout = target.interpreter.gil_layout
    if layout is None:
        return 0, 0, 0
    pthread_tid = glibc_tid_offset(target.cond_signal[0])
    try:
        with procfs.Memory(target.pid) as mem:
            tids = set(procfs.ns_tid_map(target.pid))
            tstate = _peek_u64(mem, target.gil.address + layout.locked - 8)
            raw = _peek_some(mem, tstate) if tstate else b""

            def native(off: int) -> bool:
                return off + 8 <= len(raw) and _u64(raw, off) in tids

            def pthread(off: int) -> bool:
                if pthread_tid is None or off + 8 > len(raw) or not _u64(raw, off):
                    return False
                return int.from_bytes(_peek(mem, _u64(raw, off) + pthread_tid, 4),
                                      "little") in tids

            if layout.tstate_native_thread_id is not None and native(
                    layout.tstate_native_thread_id):
                return events.GIL_TID_NATIVE, layout.tstate_native_thread_id, 0
            if layout.tstate_thread_id is not None and pthread(layout.tstate_thread_id):
                return events.GIL_TID_PTHREAD, layout.tstate_thread_id, pthread_tid or 0
            found = _tid_offsets(mem, tstate, raw, tids)
            if len(found) == 1:
                return events.GIL_TID_NATIVE, found[0], 0
    except (OSError, ValueError, TargetError):
        pass
    return 0, 0, 0


def _tid_offsets(mem: Any, tstate: int, raw: bytes, tids: set[int]) -> list[int]:
    """Offsets in PyThreadState where this thread state and the others after it
    (its `next`, 8 bytes in, every version) each hold a distinct tid of the
    process. One thread state alone is ambiguous in a PID namespace, where the
    main thread's tid is 1 and small ints abound; a few threads settle it."""
    states = [raw]
    address = _u64(raw, 8) if len(raw) >= 16 else 0
    while address and len(states) < 8:
        more = _peek_some(mem, address)
        if len(more) < len(raw):
            break
        states.append(more)
        address = _u64(more, 8)
    found = []
    for off in range(0, len(raw) - 7, 8):
        values = [_u64(state, off) for state in states]
        if all(v in tids for v in values) and len(set(values)) == len(values):
            found.append(off)
    return found


def _peek(mem: Any, address: int, size: int) -> bytes:
    """One read (procfs.Memory.pread): fewer bytes where the mapping ends; OSError
    where nothing at address can be read."""
    data = mem.pread(address, size)
    return bytes(data) if data else b""


def _peek_some(mem: Any, address: int) -> bytes:
    """Up to 1 KiB at address: less where the mapping ends sooner."""
    for size in (1024, 512, 256):
        try:
            return _peek(mem, address, size)
        except OSError:
            continue
    return b""


def _peek_u64(mem: Any, address: int) -> int:
    data = _peek(mem, address, 8)
    return _u64(data, 0) if len(data) == 8 else 0


def _u64(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 8], "little")


def mark_target(pid_bits: Any, pid: int, on: bool) -> None:
    """Set or clear a pid's bit in the probes' target-pid bitmap (target_pids in
    bpf/gil.bpf.c): the tracepoints skip every other process on that bit."""
    word = ctypes.c_uint32(pid // 64)
    bits = int(pid_bits[word].value)
    bits = bits | (1 << pid % 64) if on else bits & ~(1 << pid % 64)
    pid_bits[word] = ctypes.c_uint64(bits)
