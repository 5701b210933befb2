"""A uprobe registered the way another tracer would, through perf_event_open(2),
with a reference counter (as USDT semaphores use): the kernel then refuses a
second uprobe at the same place without one ("ref_ctr_offset mismatch")."""

from __future__ import annotations

import ctypes
import os

from otel_gil.target.elf import ElfObject

PERF_EVENT_OPEN = 298  # x86-64 syscall number
REF_CTR_SHIFT = 32  # PERF_UPROBE_REF_CTR_OFFSET_SHIFT (kernel/events/core.c)


class _Attr(ctypes.Structure):  # the head of struct perf_event_attr (uapi)
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("sample_period", ctypes.c_uint64),
                ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64),
                ("config2", ctypes.c_uint64), ("pad", ctypes.c_uint8 * 64)]


def file_offset(path: str, vaddr: int) -> int:
    with ElfObject(path) as obj:
        for p_offset, p_vaddr, p_filesz in obj.load_segments():
            if p_vaddr <= vaddr < p_vaddr + p_filesz:
                return vaddr - p_vaddr + p_offset
    raise ValueError(f"{vaddr:#x} is not in a loaded segment of {path}")


def harmless_counter(path: str) -> int:
    """File offset of 2 bytes of alignment padding between two objects in
    .data: the kernel increments the reference counter in every process that
    maps the file, so it must be memory nothing reads."""
    with ElfObject(path) as obj:
        data = obj.section_range(".data")
        assert data is not None, path
        lo, hi = data[0], data[0] + data[1]
        objs = sorted((s.value, s.size) for s in obj.symbols(".symtab")
                      if lo <= s.value < hi and s.size)
    for (a, n), (b, _) in zip(objs, objs[1:]):
        gap = (a + n + 1) & ~1
        if gap + 2 <= b:
            return file_offset(path, gap)
    raise ValueError(f"no padding in .data of {path}")


def open_uprobe(path: str, vaddr: int, pid: int, ref_ctr_offset: int) -> int:
    """A perf uprobe event at path's vaddr for pid, with a reference counter; its fd."""
    with open("/sys/bus/event_source/devices/uprobe/type") as f:
        pmu = int(f.read())
    name = ctypes.create_string_buffer(path.encode())
    attr = _Attr(type=pmu, size=72,  # PERF_ATTR_SIZE_VER1: up to config2
                 config=ref_ctr_offset << REF_CTR_SHIFT,
                 config1=ctypes.addressof(name), config2=file_offset(path, vaddr))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(PERF_EVENT_OPEN, ctypes.byref(attr), pid, -1, -1, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int(fd)
