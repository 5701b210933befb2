"""The structs of bpf/gil.h, mirrored once with ctypes, and their decoders.

tests/test_events.py compiles gil.h with gcc and checks every size and offset
here against it, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Dict, NamedTuple, Optional, Tuple

# Constants from bpf/gil.h (checked by the same test).
GIL_HIST_MIN_SHIFT = 6
GIL_HIST_BUCKETS = 128
GIL_MAX_HOLDERS = 16
GIL_HOLD_RING = 16
GIL_CTX_HEADER_SIZE = 64
GIL_CTX_SLOT_SIZE = 128
GIL_CTX_PROBES = 4
GIL_EVENT_WAIT = 1
GIL_EVENT_HOLD = 2


class ThreadCtx(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("trace_id", ctypes.c_uint8 * 16),
        ("span_id", ctypes.c_uint8 * 8),
        ("valid", ctypes.c_uint8),
        ("trace_flags", ctypes.c_uint8),
        ("attrs_data_size", ctypes.c_uint16),
    ]


class CtxSlotHead(ctypes.Structure):
    _pack_ = 1
    _fields_ = [
        ("tid", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("ident", ctypes.c_uint64),
        ("ctx", ThreadCtx),
    ]


class GilHold(ctypes.Structure):
    _fields_ = [
        ("tid", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("ctx", ThreadCtx),
        ("pad", ctypes.c_uint8 * 4),
    ]


class GilEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("nholds", ctypes.c_uint32),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("holds_total", ctypes.c_uint64),
        ("ctx", ThreadCtx),
        ("span_changed", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("holds", GilHold * GIL_MAX_HOLDERS),
    ]


class ThreadStats(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("exited", ctypes.c_uint32),
        ("wait_start", ctypes.c_uint64),
        ("hold_start", ctypes.c_uint64),
        ("wait_seq", ctypes.c_uint64),
        ("acquisitions", ctypes.c_uint64),
        ("wait_ns", ctypes.c_uint64),
        ("hold_ns", ctypes.c_uint64),
        ("max_wait_ns", ctypes.c_uint64),
        ("max_hold_ns", ctypes.c_uint64),
        ("unmatched", ctypes.c_uint64),
        ("wait_hist", ctypes.c_uint32 * GIL_HIST_BUCKETS),
        ("hold_hist", ctypes.c_uint32 * GIL_HIST_BUCKETS),
        ("hold_ctx", ThreadCtx),
        ("pad", ctypes.c_uint8 * 4),
    ]


class Target(ctypes.Structure):
    _fields_ = [
        ("cond_addr", ctypes.c_uint64),
        ("ctx_table", ctypes.c_uint64),
        ("ctx_slots", ctypes.c_uint32),
        ("ns_translate", ctypes.c_uint32),
        ("ns_dev", ctypes.c_uint64),
        ("ns_ino", ctypes.c_uint64),
        ("interval_ns", ctypes.c_uint64),
        ("holder_tid", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("acq_seq", ctypes.c_uint64),
        ("handoffs", ctypes.c_uint64),
        ("forced_switches", ctypes.c_uint64),
        ("lost", ctypes.c_uint64),
        ("untracked", ctypes.c_uint64),
        ("releases", ctypes.c_uint64),
        ("ring", GilHold * GIL_HOLD_RING),
    ]


# ------------------------------------------------------------------ decoded forms


# SpanRef, Hold and Interval are NamedTuples, not frozen dataclasses: a wait event carries
# up to 16 holds, and a tuple is built in C where a frozen dataclass pays one
# object.__setattr__ per field (the sidecar decodes hundreds of events a second).
class SpanRef(NamedTuple):
    """A span context as the probes saw it (OTEP 4947 record)."""

    trace_id: int
    span_id: int
    trace_flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.trace_flags & 1)


def _span_ref(trace_id: bytes, span_id: bytes, valid: int, flags: int) -> Optional[SpanRef]:
    if not valid:
        return None
    tid, sid = int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big")
    if not tid or not sid:
        return None
    return SpanRef(tid, sid, flags)


def decode_ctx(raw: ThreadCtx) -> SpanRef | None:
    return _span_ref(bytes(raw.trace_id), bytes(raw.span_id), raw.valid, raw.trace_flags)


class Hold(NamedTuple):
    tid: int
    start_ns: int
    end_ns: int
    span: Optional[SpanRef]

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class Interval(NamedTuple):
    """A wait or hold at or above its threshold, as one ring-buffer event."""

    kind: str  # "wait" or "hold"
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    span: Optional[SpanRef]
    holds: Tuple[Hold, ...] = ()  # waits: holds that overlapped, newest first
    holds_total: int = 0  # waits: acquisitions by others during the wait
    span_changed: bool = False  # holds: the thread entered another span during the hold

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


# struct gil_event and struct gil_hold as struct formats, for decode_event:
# unpacking the bytes at once is several times cheaper than ctypes field access.
# tests/test_events.py checks them against the ctypes mirrors above.
EVENT_HEAD = struct.Struct("<IIIIQQQ16s8sBBHB3x")  # up to holds[]
EVENT_HOLD = struct.Struct("<I4xQQ16s8sBBH4x")


def decode_event(data: bytes) -> Interval:
    """Decode one ring-buffer record (bytes of a struct gil_event)."""
    size = ctypes.sizeof(GilEvent)
    if len(data) < size:
        raise ValueError(f"short event: {len(data)} bytes, want {size}")
    (kind, pid, tid, nholds, start_ns, end_ns, holds_total, trace_id, span_id, valid, flags,
     _attrs, span_changed) = EVENT_HEAD.unpack_from(data, 0)
    if kind not in (GIL_EVENT_WAIT, GIL_EVENT_HOLD):
        raise ValueError(f"unknown event kind {kind}")
    return Interval(
        kind="wait" if kind == GIL_EVENT_WAIT else "hold",
        pid=pid, tid=tid, start_ns=start_ns, end_ns=end_ns,
        span=_span_ref(trace_id, span_id, valid, flags),
        holds=_holds(data, min(nholds, GIL_MAX_HOLDERS)), holds_total=holds_total,
        span_changed=bool(span_changed),
    )


# The last holds decoded, by their raw bytes: under contention consecutive wait
# events carry mostly the same holds (the process's last GIL_HOLD_RING), so most
# are found here instead of decoded again. Cleared when full.
_HOLD_CACHE: Dict[bytes, Hold] = {}
_HOLD_CACHE_MAX = 2048


def _holds(data: bytes, n: int) -> Tuple[Hold, ...]:
    out = []
    size = EVENT_HOLD.size
    for offset in range(EVENT_HEAD.size, EVENT_HEAD.size + n * size, size):
        raw = data[offset:offset + size]
        hold = _HOLD_CACHE.get(raw)
        if hold is None:
            tid, start, end, trace_id, span_id, valid, flags, _attrs = EVENT_HOLD.unpack(raw)
            hold = Hold(tid, start, end, _span_ref(trace_id, span_id, valid, flags))
            if len(_HOLD_CACHE) >= _HOLD_CACHE_MAX:
                _HOLD_CACHE.clear()
            _HOLD_CACHE[raw] = hold
        out.append(hold)
    return tuple(out)
