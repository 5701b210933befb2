"""The app's context table: one anonymous mapping, a slot per thread.

This module runs *inside the traced app* (Python 3.8+, stdlib only). The bytes
are otel_gil/abi/slots.py's; this is the writer: a thread claims the slot for
its native thread id (one of PROBES candidates, as the probes look them up),
writes its tid, Python ident and name there once, and from then on only its
26-byte id record (otel_gil/app/publish.py, at every attach and detach).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from typing import Any

from otel_gil.abi.slots import (
    COUNTERS,
    COUNTERS_OFFSET,
    HEADER,
    HEADER_SIZE,
    IDS_OFFSET,
    IDS_SIZE,
    MAGIC,
    PROBES,
    SLOT_HEAD,
    SLOT_SIZE,
    TID,
    TID_EXITED,
    VALID_OFFSET,
    VERSION,
    encode_attrs,
)

DEFAULT_SLOTS = 1024
MAPPING_NAME = b"otel-gil-ctx"

# prctl(2) constants from linux/prctl.h (PR_SET_VMA since Linux 5.17).
_PR_SET_VMA = 0x53564D41
_PR_SET_VMA_ANON_NAME = 0


def _libc() -> Any | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc (static embed)
        return None


def buffer_address(mm: mmap.mmap) -> int:
    """Virtual address of an mmap's first byte (from_buffer pins the mapping open)."""
    holder = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(holder)
    del holder  # a live export would make mm.close() fail later
    return address


def name_mapping(address: int, length: int, name: bytes) -> bool:
    """Name an anonymous mapping in /proc/PID/maps; False where the kernel refuses
    (before 5.17, or without CONFIG_ANON_VMA_NAME, or on file-backed memory)."""
    libc = _libc()
    if libc is None:
        return False
    c_name = ctypes.c_char_p(name)
    rc = libc.prctl(ctypes.c_int(_PR_SET_VMA), ctypes.c_ulong(_PR_SET_VMA_ANON_NAME),
                    ctypes.c_ulong(address), ctypes.c_ulong(length), c_name)
    return bool(rc == 0)


class _Lease:
    """A thread's claim on a slot; kept in a threading.local so that it dies with
    the thread (CPython clears a thread's locals in PyThreadState_Clear, on that
    thread, as it exits: Modules/_threadmodule.c, 3.8 to 3.13) and frees the slot."""

    __slots__ = ("claim", "index", "table")

    def __init__(self, table: ContextTable, index: int, claim: int) -> None:
        self.table = table
        self.index = index
        self.claim = claim  # the table remembers this number, not the lease itself

    def __del__(self) -> None:
        try:
            self.table._release(self)
        except Exception:  # noqa: BLE001, S110 - runs at thread exit, nothing may escape
            pass


class ContextTable:
    """The app-side context table: one page-aligned anonymous mapping, kept for
    the life of the process (the sidecar holds its address)."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        if slots <= 0 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two, not {slots}")
        self.slots = slots
        self.size = -(-(HEADER_SIZE + slots * SLOT_SIZE) // mmap.PAGESIZE) * mmap.PAGESIZE
        # MAP_PRIVATE, not the default MAP_SHARED: a forked child must get its own
        # copy, never write into its parent's table (see _after_fork).
        self._mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE)
        self.address = buffer_address(self._mm)
        self.named = name_mapping(self.address, self.size, MAPPING_NAME)
        HEADER.pack_into(self._mm, 0, MAGIC, VERSION, slots, SLOT_SIZE, HEADER_SIZE)
        self._owners: list[int] = [0] * slots  # claim number of each slot's lease
        self._claims = 0
        self._lock = threading.Lock()

    # Kept in the header, where the sidecar reads them (read_counters). Writes
    # are one 8-byte pack_into under the GIL: a reader sees the old or the new value.
    @property
    def unplaced(self) -> int:
        """Threads that found all their PROBES slots taken."""
        return int(COUNTERS.unpack_from(self._mm, COUNTERS_OFFSET)[0])

    @unplaced.setter
    def unplaced(self, value: int) -> None:
        struct.pack_into("<Q", self._mm, COUNTERS_OFFSET, value)

    @property
    def errors(self) -> int:
        """Exceptions swallowed on the hot path."""
        return int(COUNTERS.unpack_from(self._mm, COUNTERS_OFFSET)[1])

    @errors.setter
    def errors(self, value: int) -> None:
        struct.pack_into("<Q", self._mm, COUNTERS_OFFSET + 8, value)

    def slot_offset(self, index: int) -> int:
        return HEADER_SIZE + index * SLOT_SIZE

    def claim(self, tid: int, ident: int, name: str) -> _Lease | None:
        """Claim tid's slot: the one already holding tid among its PROBES
        candidates, else the first free one (the probes take the first whose tid
        matches). None when all are taken by other threads."""
        mask = self.slots - 1
        with self._lock:  # two new threads could otherwise claim one free slot
            candidates = [(tid + k) & mask for k in range(PROBES)]
            heads = [TID_EXITED.unpack_from(self._mm, self.slot_offset(i)) for i in candidates]
            chosen = next((i for i, (t, _) in zip(candidates, heads) if t == tid), None)
            if chosen is None:  # free: never used, or left by a thread that exited
                chosen = next((i for i, (t, gone) in zip(candidates, heads)
                               if t == 0 or gone), None)
            if chosen is None:
                self.unplaced += 1
                return None
            self._claims += 1
            lease = _Lease(self, chosen, self._claims)
            self._owners[chosen] = self._claims
            attrs = encode_attrs(name)
            head = SLOT_HEAD.pack(tid, 0, ident, b"", b"", 0, 0, len(attrs))
            self._mm[self.slot_offset(chosen):self.slot_offset(chosen + 1)] = (
                (head + attrs).ljust(SLOT_SIZE, b"\0"))
            return lease

    def _release(self, lease: _Lease) -> None:
        """Mark the slot free but keep the thread's tid and name: the sidecar may
        still have to name this thread (a holder in a wait it exports later).
        The record is invalidated, so the probes read no context from it."""
        with self._lock:
            if self._owners[lease.index] == lease.claim:  # not re-claimed by a reused tid
                self._owners[lease.index] = 0
                offset = self.slot_offset(lease.index)
                self._mm[offset + VALID_OFFSET] = 0
                TID_EXITED.pack_into(self._mm, offset, TID.unpack_from(self._mm, offset)[0], 1)

    def view(self, lease: _Lease | None) -> memoryview:
        """Where a thread writes its 26-byte id record: its slot, or scratch memory
        for a thread without one (so the hot path has no branch for it)."""
        if lease is None:
            return memoryview(bytearray(IDS_SIZE))
        start = self.slot_offset(lease.index) + IDS_OFFSET
        return memoryview(self._mm)[start:start + IDS_SIZE]

    def clear_valid(self) -> None:
        """Mark every record invalid (uninstall): a one-byte store per slot, which
        a reader on another thread cannot see torn."""
        for index in range(self.slots):
            self._mm[self.slot_offset(index) + VALID_OFFSET] = 0

    def reset(self) -> None:
        """Forget every slot (a forked child: none of its parent's threads exist)."""
        self._lock = threading.Lock()
        self._owners = [0] * self.slots
        self._mm[HEADER_SIZE:] = bytes(self.size - HEADER_SIZE)
        self.unplaced = self.errors = 0  # the parent's, not ours

    def raw(self) -> bytes:
        return bytes(self._mm)
