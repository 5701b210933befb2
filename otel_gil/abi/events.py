"""The kernel's structs of bpf/gil.h, mirrored once with ctypes, and their decoders.

tests/test_events.py compiles gil.h with gcc and checks every size and offset
here against it, so the two cannot drift apart silently. The context table's
structs (thread_ctx, ctx_slot_head) are otel_gil/abi/slots.py's.

A GIL event is born in bpf/gil.bpf.c as a struct gil_event in the ring buffer;
decode_event() turns it into an Interval, what every later stage works on.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from otel_gil.abi.slots import ThreadCtx

# Constants from bpf/gil.h (checked by the same test).
GIL_HIST_MIN_SHIFT = 6
GIL_HIST_BUCKETS = 128
GIL_MAX_HOLDERS = 16
GIL_HOLD_RING = 16
GIL_HOLDER_SLOTS = 16
GIL_PID_WORDS = 65536
GIL_EVENT_WAIT = 1
GIL_EVENT_HOLD = 2
GIL_EVENT_STACK = 3
GIL_MAX_PYFRAMES = 32
GIL_STACK_CHUNK = 1024
GIL_STACK_CHUNKS = 12
GIL_NO_OFFSET = 0xFFFFFFFF
GIL_SET_CONTENDED = 1
GIL_SET_ALL = 2
GIL_NS_TID = 1
GIL_START_SEEN = 2
GIL_TID_NATIVE = 1
GIL_TID_PTHREAD = 2
PROBE_SETS = {GIL_SET_CONTENDED: "contended", GIL_SET_ALL: "all"}


class GilHold(ctypes.Structure):
    _fields_ = [
        ("tid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("ctx", ThreadCtx),
        ("stack_seq", ctypes.c_uint32),
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
        ("probe_set", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("stack_seq", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
        ("holds", GilHold * GIL_MAX_HOLDERS),
    ]


class ThreadStats(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("exited", ctypes.c_uint16),
        ("in_timed_wait", ctypes.c_uint16),
        ("wait_start", ctypes.c_uint64),
        ("hold_start", ctypes.c_uint64),
        ("wait_seq", ctypes.c_uint64),
        ("acquisitions", ctypes.c_uint64),
        ("wait_ns", ctypes.c_uint64),
        ("hold_ns", ctypes.c_uint64),
        ("max_wait_ns", ctypes.c_uint64),
        ("max_hold_ns", ctypes.c_uint64),
        ("unmatched", ctypes.c_uint64),
        ("waits", ctypes.c_uint64),
        ("timed_waits", ctypes.c_uint64),
        ("saved_switch", ctypes.c_uint64),
        ("free_at", ctypes.c_uint64),
        ("take_ns", ctypes.c_uint64),
        ("wait_hist", ctypes.c_uint32 * GIL_HIST_BUCKETS),
        ("hold_hist", ctypes.c_uint32 * GIL_HIST_BUCKETS),
        ("hold_ctx", ThreadCtx),
        ("stack_seq", ctypes.c_uint32),
    ]


class HolderStats(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("ns_tid", ctypes.c_uint32),
        ("hold_ns", ctypes.c_uint64),
        ("holds", ctypes.c_uint64),
        ("max_hold_ns", ctypes.c_uint64),
    ]


class HolderSlot(ctypes.Structure):
    _fields_ = [
        ("ns_tid", ctypes.c_uint64),
        ("hold_ns", ctypes.c_uint64),
        ("holds", ctypes.c_uint64),
        ("max_hold_ns", ctypes.c_uint64),
    ]


class TargetState(ctypes.Structure):
    """struct target: one traced process's configuration and kernel-side state
    (not otel_gil.target.process.Target, what inspecting the process found)."""


    _fields_ = [
        ("cond_addr", ctypes.c_uint64),
        ("ctx_table", ctypes.c_uint64),
        ("ctx_slots", ctypes.c_uint32),
        ("ns_translate", ctypes.c_uint32),
        ("ns_dev", ctypes.c_uint64),
        ("ns_ino", ctypes.c_uint64),
        ("interval_ns", ctypes.c_uint64),
        ("gil_addr", ctypes.c_uint64),
        ("off_locked", ctypes.c_uint32),
        ("off_holder", ctypes.c_uint32),
        ("off_switch", ctypes.c_uint32),
        ("tid_how", ctypes.c_uint32),
        ("off_tid", ctypes.c_uint32),
        ("off_pthread_tid", ctypes.c_uint32),
        ("holder_tid", ctypes.c_uint32),
        ("waiting", ctypes.c_uint32),
        ("acq_seq", ctypes.c_uint64),
        ("handoffs", ctypes.c_uint64),
        ("forced_switches", ctypes.c_uint64),
        ("lost", ctypes.c_uint64),
        ("untracked", ctypes.c_uint64),
        ("releases", ctypes.c_uint64),
        ("ring", GilHold * GIL_HOLD_RING),
        ("drop_switch", ctypes.c_uint64),
        ("obs_switch", ctypes.c_uint64),
        ("obs_holder", ctypes.c_uint32),
        ("obs_flags", ctypes.c_uint32),
        ("obs_start", ctypes.c_uint64),
        ("obs_last", ctypes.c_uint64),
        ("obs_ctx", ThreadCtx),
        ("torn_reads", ctypes.c_uint32),
        ("read_errors", ctypes.c_uint32),
        ("wakeups", ctypes.c_uint64),
        ("switch_first", ctypes.c_uint64),
        ("switch_last", ctypes.c_uint64),
        ("stacks", ctypes.c_uint32),
        ("off_frame", ctypes.c_uint32),
        ("off_frame2", ctypes.c_uint32),
        ("off_prev", ctypes.c_uint32),
        ("off_code", ctypes.c_uint32),
        ("off_instr", ctypes.c_uint32),
        ("stack_tid", ctypes.c_uint32),
        ("stack_seq", ctypes.c_uint32),
        ("stack_blocked", ctypes.c_uint32),
        ("stack_blocks", ctypes.c_uint32),
        ("stack_switch", ctypes.c_uint64),
        ("stacks_taken", ctypes.c_uint64),
        ("stacks_lost", ctypes.c_uint64),
        ("stack_block_ns", ctypes.c_uint64),
        ("stack_next", ctypes.c_uint32),
        ("stack_hold", ctypes.c_uint32),
        ("held", HolderSlot * GIL_HOLDER_SLOTS),
    ]


class GilPyFrame(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint64),
        ("instr", ctypes.c_uint64),
    ]


class GilStack(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("seq", ctypes.c_uint32),
        ("when_ns", ctypes.c_uint64),
        ("switch_number", ctypes.c_uint64),
        ("user_stack_id", ctypes.c_int32),
        ("blocked", ctypes.c_uint32),
        ("nframes", ctypes.c_uint32),
        ("stack_len", ctypes.c_uint32),
        ("ip", ctypes.c_uint64),
        ("sp", ctypes.c_uint64),
        ("bp", ctypes.c_uint64),
        ("frames", GilPyFrame * GIL_MAX_PYFRAMES),
        ("stack", ctypes.c_uint8 * (GIL_STACK_CHUNK * GIL_STACK_CHUNKS)),
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
    span: SpanRef | None
    start_seen: bool = False  # contended set: start is when a waiter first saw it

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
    probe_set: str = "all"  # which probe set saw it ("contended" or "all")
    start_seen: bool = False  # contended holds: start is when a waiter first saw it
    # Holder stacks (otel_gil/stacks/store.py): the seq of the stack taken in the hold
    # (a hold: one; a wait: one per entry of holds, 0 = none), and once the
    # sidecar has matched them, the HolderStack (or None) of each.
    stack_seqs: Tuple[int, ...] = ()
    stacks: Tuple[Any, ...] = ()

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


# The same layouts as struct formats, for decode_event: unpacking the bytes at
# once is several times cheaper than ctypes field access, per event and hold.
# tests/test_events.py checks them against the ctypes mirrors above.
EVENT_SIZE = ctypes.sizeof(GilEvent)
EVENT_HEAD = struct.Struct("<IIIIQQQ16s8sBBHBBBxII")  # up to holds[]
EVENT_HOLD = struct.Struct("<IIQQ16s8sBBHI")  # one struct gil_hold

# The last holds decoded, by their raw bytes and pid: under contention
# consecutive waits carry mostly the same holds (the process's last
# GIL_HOLD_RING), so most are found here instead of decoded again (a decode of
# 16 holds was half of the sidecar's CPU under the 64-thread soak without it).
_HOLD_CACHE: Dict[Tuple[int, bytes], Tuple[Hold, int]] = {}
_HOLD_CACHE_MAX = 2048
_new_interval = tuple.__new__


def decode_event(data: bytes, host_tid: Callable[[int, int], int] | None = None) -> Interval:
    """Decode one ring-buffer record (bytes of a struct gil_event).

    host_tid(pid, ns_tid) gives the sidecar's tid of a thread whose tid the
    probes read from the target (GIL_NS_TID: a holder seen by the contended
    set); without it, such tids are kept as they are."""
    if len(data) < EVENT_SIZE:
        raise ValueError(f"short event: {len(data)} bytes, want {EVENT_SIZE}")
    (kind, pid, tid, nholds, start_ns, end_ns, holds_total, trace_id, span_id, valid,
     trace_flags, _attrs, span_changed, probe_set, flags, stack_seq, _pad2) = \
        EVENT_HEAD.unpack_from(data, 0)
    if kind not in (GIL_EVENT_WAIT, GIL_EVENT_HOLD):
        raise ValueError(f"unknown event kind {kind}")
    if probe_set not in PROBE_SETS:
        raise ValueError(f"unknown probe set {probe_set}")
    if host_tid is not None and flags & GIL_NS_TID:
        tid = host_tid(pid, tid)
    span = _span_ref(trace_id, span_id, valid, trace_flags)
    holds, seqs = _holds(data, min(nholds, GIL_MAX_HOLDERS), pid, host_tid)
    if kind == GIL_EVENT_HOLD:
        seqs = (stack_seq,)
    # Positional, through tuple.__new__: the keyword constructor of a
    # 13-field NamedTuple was a tenth of the decode.
    return _new_interval(Interval, (
        "wait" if kind == GIL_EVENT_WAIT else "hold", pid, tid, start_ns, end_ns, span,
        holds, holds_total, bool(span_changed), PROBE_SETS[probe_set],
        bool(flags & GIL_START_SEEN), seqs if any(seqs) else (), ()))


# The fields of a struct gil_event that say whether a wait can become a span:
# kind, pid, then (after tid, nholds, start, end, holds_total) the waiter's
# trace id, span id, valid and trace_flags, and (after attrs, span_changed)
# the probe set.
_PEEK = struct.Struct("<II32x16s8sBB3xB")
_NO_TRACE, _NO_SPAN = bytes(16), bytes(8)


def unparented_wait(data: bytes) -> Optional[Tuple[int, bool]]:
    """(pid, in a span) of a wait event whose waiter was in no sampled span:
    no span can be made of it, so a reader that only counts such waits need not
    decode them (nearly every wait, under a load with work between spans).
    None for any other event, or one too short to be an event."""
    if len(data) < EVENT_SIZE:
        return None
    kind, pid, trace_id, span_id, valid, trace_flags, probe_set = _PEEK.unpack_from(data, 0)
    if kind != GIL_EVENT_WAIT or probe_set not in PROBE_SETS:
        return None  # (an unknown probe set: the decoder's to reject)
    in_span = bool(valid) and trace_id != _NO_TRACE and span_id != _NO_SPAN
    return None if in_span and trace_flags & 1 else (pid, in_span)


def _holds(data: bytes, n: int, pid: int, host_tid: Callable[[int, int], int] | None
           ) -> Tuple[Tuple[Hold, ...], Tuple[int, ...]]:
    """The first n holds of an event, and their stack seqs."""
    holds, seqs = [], []
    size, cache = EVENT_HOLD.size, _HOLD_CACHE
    for offset in range(EVENT_HEAD.size, EVENT_HEAD.size + n * size, size):
        key = (pid, data[offset:offset + size])
        hit = cache.get(key)
        if hit is None:
            tid, flags, start, end, trace_id, span_id, valid, trace_flags, _attrs, seq = \
                EVENT_HOLD.unpack(key[1])
            if host_tid is not None and flags & GIL_NS_TID:
                tid = host_tid(pid, tid)
            hit = (Hold(tid, start, end, _span_ref(trace_id, span_id, valid, trace_flags),
                        bool(flags & GIL_START_SEEN)), seq)
            if len(cache) >= _HOLD_CACHE_MAX:
                cache.clear()
            cache[key] = hit
        holds.append(hit[0])
        seqs.append(hit[1])
    return tuple(holds), tuple(seqs)
