"""The structs of bpf/gil.h, mirrored once with ctypes, and their decoders.

tests/test_events.py compiles gil.h with gcc and checks every size and offset
here against it, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Tuple

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


@dataclass(frozen=True)
class SpanRef:
    """A span context as the probes saw it (OTEP 4947 record)."""

    trace_id: int
    span_id: int
    trace_flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.trace_flags & 1)


def decode_ctx(raw: ThreadCtx) -> SpanRef | None:
    if not raw.valid:
        return None
    trace_id = int.from_bytes(bytes(raw.trace_id), "big")
    span_id = int.from_bytes(bytes(raw.span_id), "big")
    if not trace_id or not span_id:
        return None
    return SpanRef(trace_id, span_id, raw.trace_flags)


@dataclass(frozen=True)
class Hold:
    tid: int
    start_ns: int
    end_ns: int
    span: SpanRef | None

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass(frozen=True)
class Interval:
    """A wait or hold at or above its threshold, as one ring-buffer event."""

    kind: str  # "wait" or "hold"
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    span: SpanRef | None
    holds: Tuple[Hold, ...] = ()  # waits: holds that overlapped, newest first
    holds_total: int = 0  # waits: acquisitions by others during the wait
    span_changed: bool = False  # holds: the thread entered another span during the hold

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


def decode_event(data: bytes) -> Interval:
    """Decode one ring-buffer record (bytes of a struct gil_event)."""
    if len(data) < ctypes.sizeof(GilEvent):
        raise ValueError(f"short event: {len(data)} bytes, want {ctypes.sizeof(GilEvent)}")
    ev = GilEvent.from_buffer_copy(data[: ctypes.sizeof(GilEvent)])
    if ev.kind not in (GIL_EVENT_WAIT, GIL_EVENT_HOLD):
        raise ValueError(f"unknown event kind {ev.kind}")
    holds = tuple(
        Hold(h.tid, h.start_ns, h.end_ns, decode_ctx(h.ctx))
        for h in ev.holds[: min(ev.nholds, GIL_MAX_HOLDERS)]
    )
    return Interval(
        kind="wait" if ev.kind == GIL_EVENT_WAIT else "hold",
        pid=ev.pid, tid=ev.tid, start_ns=ev.start_ns, end_ns=ev.end_ns,
        span=decode_ctx(ev.ctx), holds=holds, holds_total=ev.holds_total,
        span_changed=bool(ev.span_changed),
    )
