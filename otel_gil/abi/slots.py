"""The context table's bytes: what the app writes and the probes and the sidecar read.

A 64-byte header and a power-of-two number of 128-byte slots (bpf/gil.h:
GIL_CTX_HEADER_SIZE, GIL_CTX_SLOT_SIZE, ``struct ctx_slot_head``). Each slot
starts with the owning thread's native tid, a word the app sets to 1 when that
thread exits, its Python ident, and an OTEP 4947 thread-context record
(``struct thread_ctx``: trace id, span id, valid, flags, attributes size); the
record's attribute entries (key index, length, bytes) follow, up to the slot's end.

The slot head is mirrored once, as the ctypes structures below, which
tests/test_events.py compiles against gil.h with gcc; the struct formats and
offsets the hot paths use are derived from them, never written out by hand.

The header: magic[8], version, slots, slot_size, header_size (u32 each), then
two u64 counters the app keeps for the sidecar to report: threads that found
no slot (unplaced) and exceptions swallowed on the hot path (errors). Older
tables have zeros there.

Little-endian and packed, like the kernel side on x86-64 and arm64 (OTEP 4947
says host-endian; both are little-endian).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import List, NamedTuple, Tuple, Type

from otel_gil.errors import TargetError
from otel_gil.trust import printable

# Constants of bpf/gil.h (tests/test_events.py checks them).
GIL_CTX_HEADER_SIZE = 64
GIL_CTX_SLOT_SIZE = 128
GIL_CTX_PROBES = 4  # a thread's slot is one of the PROBES after tid & (slots - 1)

MAGIC = b"OTELGIL\0"
VERSION = 1
HEADER_SIZE = GIL_CTX_HEADER_SIZE
SLOT_SIZE = GIL_CTX_SLOT_SIZE
PROBES = GIL_CTX_PROBES
ATTR_THREAD_NAME = 0  # key_idx of thread.name in the slot's attribute entries


class ThreadCtx(ctypes.Structure):
    """struct thread_ctx: the OTEP 4947 thread-context record header."""

    _pack_ = 1
    _fields_ = [
        ("trace_id", ctypes.c_uint8 * 16),
        ("span_id", ctypes.c_uint8 * 8),
        ("valid", ctypes.c_uint8),
        ("trace_flags", ctypes.c_uint8),
        ("attrs_data_size", ctypes.c_uint16),
    ]


class CtxSlotHead(ctypes.Structure):
    """struct ctx_slot_head: the head of one slot, what the probes read."""

    _pack_ = 1
    _fields_ = [
        ("tid", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),  # 1 once the owning thread exited
        ("ident", ctypes.c_uint64),
        ("ctx", ThreadCtx),
    ]


_CODES = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I",
          ctypes.c_uint64: "Q"}


def _format(cls: Type[ctypes.Structure]) -> str:
    """The struct-module format of a packed ctypes structure, flattened
    (a u8 array as bytes): the one mirror above, in the form pack_into wants."""
    out = ""
    for _name, ctype, *_ in cls._fields_:
        if issubclass(ctype, ctypes.Structure):
            out += _format(ctype)
        elif issubclass(ctype, ctypes.Array):
            out += f"{ctypes.sizeof(ctype)}s"  # u8 arrays only (the ids)
        else:
            out += _CODES[ctype]  # type: ignore[index]
    return out


SLOT_HEAD = struct.Struct("<" + _format(CtxSlotHead))
HEADER = struct.Struct("<8sIIII")
COUNTERS = struct.Struct("<QQ")  # unplaced, errors: right after HEADER, within HEADER_SIZE
COUNTERS_OFFSET = HEADER.size
TID = struct.Struct("<I")
TID_EXITED = struct.Struct("<II")  # tid, then the slot's reserved word: 1 = thread exited
IDS_OFFSET = CtxSlotHead.ctx.offset  # the record, within a slot
IDS_SIZE = ThreadCtx.attrs_data_size.offset  # trace_id, span_id, valid, trace_flags: the hot write
VALID_OFFSET = IDS_OFFSET + ThreadCtx.valid.offset
ATTRS_OFFSET = ctypes.sizeof(CtxSlotHead)
ATTRS_MAX = SLOT_SIZE - ATTRS_OFFSET
INVALID = bytes(IDS_SIZE)  # a record saying "no span"
assert SLOT_HEAD.size == ATTRS_OFFSET and COUNTERS_OFFSET + COUNTERS.size <= HEADER_SIZE


def ids_record(trace_id: int, span_id: int, flags: int) -> bytes:
    """The IDS_SIZE leading bytes of a thread_ctx record; ids big-endian as in W3C traceparent."""
    # one int and one to_bytes: a third of the cost of three pieces joined
    return (trace_id << 80 | span_id << 16 | 0x100 | flags & 0xFF).to_bytes(IDS_SIZE, "big")


def encode_attrs(name: str) -> bytes:
    """The attribute entries of a slot: thread.name, truncated on a character boundary."""
    raw = name.encode("utf-8", "replace")[: ATTRS_MAX - 2]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return bytes((ATTR_THREAD_NAME, len(raw))) + raw


def decode_thread_name(attrs: bytes, size: int) -> str:
    """thread.name from a slot's attribute entries; untrusted (the app wrote it)."""
    pos, end = 0, min(size, len(attrs))
    while pos + 2 <= end:
        key, length = attrs[pos], attrs[pos + 1]
        if key == ATTR_THREAD_NAME:
            return printable(attrs[pos + 2:min(pos + 2 + length, end)].decode("utf-8", "replace"))
        pos += 2 + length
    return ""


@dataclass(frozen=True)
class TableLocation:
    """Where a registered app keeps its table: what the probes are told."""

    address: int
    slots: int


class SlotRecord(NamedTuple):
    """One used slot as read from outside. A slot whose thread exited keeps its
    tid and name until another thread claims it."""

    tid: int
    ident: int
    trace_id: bytes
    span_id: bytes
    valid: int
    trace_flags: int
    thread_name: str
    exited: bool


class InvalidTable(TargetError):
    """What is at a context table's address is not one (or no longer one)."""


def _invalid() -> InvalidTable:
    return InvalidTable("no otel-gil context table at that address",
                        "pass the address printed by otel_gil.app.context.install()")


def header_slots(header: bytes, max_slots: int) -> int:
    """The slot count a header claims, refused above max_slots (the size the app
    registered): the table is the traced process's to write, so untrusted."""
    slots = int(HEADER.unpack_from(header, 0)[2])
    if slots == 0 or slots > max_slots:
        raise _invalid()
    return slots


def parse_counters(header: bytes) -> Tuple[int, int]:
    """The app's (unplaced, errors) counters from its table's header."""
    if HEADER.unpack_from(header, 0)[0] != MAGIC:
        raise TargetError("no otel-gil context table at that address",
                          "pass the address printed by otel_gil.app.context.install()")
    unplaced, errors = COUNTERS.unpack_from(header, COUNTERS_OFFSET)
    return int(unplaced), int(errors)


def parse_slots(raw: bytes) -> List[SlotRecord]:
    """Decode a table image (header and slots): the occupied slots."""
    magic, version, slots, slot_size, header_size = HEADER.unpack_from(raw, 0)
    if magic != MAGIC or version != VERSION or slot_size != SLOT_SIZE or \
            header_size != HEADER_SIZE or slots & (slots - 1):
        raise _invalid()
    records = []
    for index in range(slots):
        offset = HEADER_SIZE + index * SLOT_SIZE
        if offset + SLOT_SIZE > len(raw):
            break
        tid, gone, ident, trace_id, span_id, valid, flags, size = \
            SLOT_HEAD.unpack_from(raw, offset)
        if tid == 0:
            continue
        name = decode_thread_name(raw[offset + ATTRS_OFFSET:offset + SLOT_SIZE], size)
        records.append(SlotRecord(tid, ident, trace_id, span_id, valid, flags, name, bool(gone)))
    return records
