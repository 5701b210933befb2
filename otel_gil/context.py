"""Publishing the active span of every thread, for the probes to read.

This module runs *inside the traced app* (Python 3.8+, opentelemetry-api and
the stdlib only). It must be cheap and must never raise into the app.

The app keeps a *context table* in its own memory: a 64-byte header and a
power-of-two number of 128-byte slots (layout in ``bpf/gil.h``, ``struct
ctx_slot_head``). A thread owns the slot for its native thread id; at every
OpenTelemetry ``attach``/``detach`` it writes the now-current span context into
it as an OTEP 4947 thread-context record. Where the thread's contextvars Context
changes with no attach (an event loop switching tasks, a worker thread running a
copied context), otel_gil/event_loop.py calls publish_entered()/publish_current().
The eBPF probes read the calling thread's slot with ``bpf_probe_read_user`` at
GIL events.

The app's resource is published separately, as an OTEP 4719 process context
(otel_gil/process_context.py), which reuses this module's memory helpers.

The header (64 bytes): magic[8], version, slots, slot_size, header_size (u32
each), then two u64 counters the app keeps there for the sidecar to report
(read_counters): threads that found no slot (unplaced) and exceptions swallowed
on the hot path (errors). Older tables have zeros there.
"""

from __future__ import annotations

import contextvars
import ctypes
import mmap
import os
import struct
import threading
from contextvars import ContextVar
from typing import Any, Callable, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context, _RuntimeContext
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

# The key trace.get_current_span() looks up (opentelemetry-api >= 1.0, which
# pyproject requires at >= 1.20); reading it directly saves a call per switch.
from opentelemetry.trace.propagation import _SPAN_KEY

from otel_gil.errors import TargetError
from otel_gil.trust import printable

__all__ = [
    "DEFAULT_SLOTS",
    "HEADER_SIZE",
    "MAGIC",
    "PROBES",
    "SLOT_SIZE",
    "VERSION",
    "ContextTable",
    "SlotRecord",
    "current_table",
    "install",
    "publish_current",
    "publish_entered",
    "read_counters",
    "read_slots",
    "read_thread_names",
    "span_ended",
    "uninstall",
    "watch_span_ends",
]

# Mirrors bpf/gil.h (GIL_CTX_HEADER_SIZE, GIL_CTX_SLOT_SIZE, GIL_CTX_PROBES).
MAGIC = b"OTELGIL\0"
VERSION = 1
HEADER_SIZE = 64
SLOT_SIZE = 128
PROBES = 4
DEFAULT_SLOTS = 1024
MAPPING_NAME = b"otel-gil-ctx"

# Little-endian and packed, like the kernel side on x86-64 and arm64 (OTEP 4947
# says host-endian; both are little-endian). Only attrs_data_size is multi-byte.
_HEADER = struct.Struct("<8sIIII")
_COUNTERS = struct.Struct("<QQ")  # unplaced, errors: right after _HEADER, within HEADER_SIZE
_COUNTERS_OFFSET = _HEADER.size
_SLOT_HEAD = struct.Struct("<IIQ16s8sBBH")  # struct ctx_slot_head: 16 + 28 bytes
_TID = struct.Struct("<I")
_TID_EXITED = struct.Struct("<II")  # tid, then the slot's reserved word: 1 = thread exited
_VALID_OFFSET = 16 + 24  # offsetof(struct ctx_slot_head, ctx.valid)
_IDS_OFFSET = 16  # offsetof(struct ctx_slot_head, ctx)
_IDS_SIZE = 26  # trace_id, span_id, valid, trace_flags: the hot write
_ATTRS_OFFSET = _SLOT_HEAD.size  # 44
_ATTRS_MAX = SLOT_SIZE - _ATTRS_OFFSET
ATTR_THREAD_NAME = 0  # key_idx of thread.name in the slot's attribute entries
_INVALID = bytes(26)
_EMPTY = Context()  # an OpenTelemetry Context with no span

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


def _ids_record(trace_id: int, span_id: int, flags: int) -> bytes:
    """The 26 leading bytes of a thread_ctx record; ids big-endian as in W3C traceparent."""
    # one int and one to_bytes: a third of the cost of three pieces joined
    return (trace_id << 80 | span_id << 16 | 0x100 | flags & 0xFF).to_bytes(26, "big")


def _attrs(name: str) -> bytes:
    """The attribute entries of a slot: thread.name, truncated on a character boundary."""
    raw = name.encode("utf-8", "replace")[: _ATTRS_MAX - 2]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return bytes((ATTR_THREAD_NAME, len(raw))) + raw


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
        _HEADER.pack_into(self._mm, 0, MAGIC, VERSION, slots, SLOT_SIZE, HEADER_SIZE)
        self._owners: list[int] = [0] * slots  # claim number of each slot's lease
        self._claims = 0
        self._lock = threading.Lock()

    # Kept in the header, where the sidecar reads them (read_counters). Writes
    # are one 8-byte pack_into under the GIL: a reader sees the old or the new value.
    @property
    def unplaced(self) -> int:
        """Threads that found all their PROBES slots taken."""
        return int(_COUNTERS.unpack_from(self._mm, _COUNTERS_OFFSET)[0])

    @unplaced.setter
    def unplaced(self, value: int) -> None:
        struct.pack_into("<Q", self._mm, _COUNTERS_OFFSET, value)

    @property
    def errors(self) -> int:
        """Exceptions swallowed on the hot path."""
        return int(_COUNTERS.unpack_from(self._mm, _COUNTERS_OFFSET)[1])

    @errors.setter
    def errors(self, value: int) -> None:
        struct.pack_into("<Q", self._mm, _COUNTERS_OFFSET + 8, value)

    def slot_offset(self, index: int) -> int:
        return HEADER_SIZE + index * SLOT_SIZE

    def claim(self, tid: int, ident: int, name: str) -> _Lease | None:
        """Claim tid's slot: the one already holding tid among its PROBES
        candidates, else the first free one (the probes take the first whose tid
        matches). None when all are taken by other threads."""
        mask = self.slots - 1
        with self._lock:  # two new threads could otherwise claim one free slot
            candidates = [(tid + k) & mask for k in range(PROBES)]
            heads = [_TID_EXITED.unpack_from(self._mm, self.slot_offset(i)) for i in candidates]
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
            attrs = _attrs(name)
            head = _SLOT_HEAD.pack(tid, 0, ident, b"", b"", 0, 0, len(attrs))
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
                self._mm[offset + _VALID_OFFSET] = 0
                _TID_EXITED.pack_into(self._mm, offset, _TID.unpack_from(self._mm, offset)[0], 1)

    def view(self, lease: _Lease | None) -> memoryview:
        """Where a thread writes its 26-byte id record: its slot, or scratch memory
        for a thread without one (so the hot path has no branch for it)."""
        if lease is None:
            return memoryview(bytearray(_IDS_SIZE))
        start = self.slot_offset(lease.index) + _IDS_OFFSET
        return memoryview(self._mm)[start:start + _IDS_SIZE]

    def clear_valid(self) -> None:
        """Mark every record invalid (uninstall): a one-byte store per slot, which
        a reader on another thread cannot see torn."""
        for index in range(self.slots):
            self._mm[self.slot_offset(index) + _IDS_OFFSET + 24] = 0

    def reset(self) -> None:
        """Forget every slot (a forked child: none of its parent's threads exist)."""
        self._lock = threading.Lock()
        self._owners = [0] * self.slots
        self._mm[HEADER_SIZE:] = bytes(self.size - HEADER_SIZE)
        self.unplaced = self.errors = 0  # the parent's, not ours

    def raw(self) -> bytes:
        return bytes(self._mm)


# --------------------------------------------------------------- the hot path

_table: ContextTable | None = None
_tls = threading.local()  # .view: the thread's record (see ContextTable.view); .lease
# id(span) -> (its SpanContext, record). A hit is one whose span returns that
# very SpanContext object (an SDK span returns the one it was made with): a new
# span that got a dead one's id has another, and the cached SpanContext, kept
# alive here, cannot be reused meanwhile. The span itself is not kept: 256
# spans (each a graph of attributes, events, links, locks) kept alive a little
# longer are promoted through the GC's generations, which cost the app several
# µs per new span (bench/span_cost.py); a SpanContext is one small tuple.
# Cleared past _CACHE_MAX.
_cache: dict[int, tuple[object, bytes]] = {}
_cached_ids: dict[int, int] = {}  # span_id -> its key in _cache (see EndedSpans)
_CACHE_MAX = 256
# The ContextVar that holds OpenTelemetry's current Context in each contextvars
# Context (ContextVarsRuntimeContext._current_context), or None when the app
# uses another runtime context: then a Context about to be entered cannot be
# read, and publish_entered() publishes "no span" rather than guess.
_otel_var: ContextVar[Context] | None = None


def _claim_current() -> memoryview:
    table = _table
    if table is None:
        return memoryview(bytearray(_IDS_SIZE))
    lease = table.claim(threading.get_native_id(), threading.get_ident(),
                        threading.current_thread().name)
    view = table.view(lease)
    _tls.lease = lease
    _tls.view = view
    return view


def _remember(span: Any) -> bytes:
    span_context = span.get_span_context()
    # An SDK span that has ended publishes "no span": work after its end
    # (an ASGI server span ends when the response is sent, and stays current
    # while the middleware finishes) would otherwise get a child outside it.
    if span_context.is_valid and getattr(span, "end_time", None) is None:
        record = _ids_record(span_context.trace_id, span_context.span_id,
                             int(span_context.trace_flags))
    else:
        record = _INVALID
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
        _cached_ids.clear()
    _cache[id(span)] = (span_context, record)
    _cached_ids[span_context.span_id] = id(span)
    return record


def span_ended(span: Any) -> None:
    """A span ended on this thread (the SDK calls span processors' on_end
    there, inside Span.end): if it is cached, it publishes "no span" from then
    on; if it is this thread's published span, its slot says so now. Never raises."""
    try:
        span_id = span.get_span_context().span_id
        key = _cached_ids.pop(span_id, None)
        hit = _cache.get(key) if key is not None else None
        if hit is not None and key is not None:
            _cache[key] = (hit[0], _INVALID)
        view = getattr(_tls, "view", None)
        if view is not None and view[24] and bytes(view[16:24]) == span_id.to_bytes(8, "big"):
            view[:] = _INVALID
    except Exception:  # noqa: BLE001 - never raise into the app
        _failed()


def _ended_spans_processor() -> Any:
    """An SDK SpanProcessor (a subclass, so that hooks newer SDKs call, such as
    _on_ending, keep their defaults) calling span_ended(). The hot path pays
    nothing for it; each span end pays one dict lookup."""
    from opentelemetry.sdk.trace import SpanProcessor  # noqa: PLC0415

    class EndedSpans(SpanProcessor):
        def on_end(self, span: Any) -> None:
            span_ended(span)

    return EndedSpans()


_ended_spans_on: set[int] = set()  # id() of the tracer providers given an EndedSpans


def watch_span_ends(tracer_provider: Any) -> None:
    """Give an SDK tracer provider a span processor calling span_ended() (once;
    default: the global one). Other providers have no such hook: their ended
    spans keep publishing while they stay current."""
    try:
        if tracer_provider is None:
            from opentelemetry import trace  # noqa: PLC0415

            tracer_provider = trace.get_tracer_provider()
        add = getattr(tracer_provider, "add_span_processor", None)
        if add is not None and id(tracer_provider) not in _ended_spans_on:
            add(_ended_spans_processor())
            _ended_spans_on.add(id(tracer_provider))
    except Exception:  # noqa: BLE001, S110 - optional: publishing works without it
        pass


def _publish(context: Context) -> None:
    """Write the calling thread's record for ``context``. Never raises.

    No reader can see a torn record: only the owning thread writes its slot,
    the probes read a slot only from that same thread (at a GIL event on it),
    and the write is one C call (a memoryview slice assignment: one memcpy,
    like one struct.pack_into but cheaper to call) made while holding the GIL,
    during which that thread reaches no GIL event.

    PublishingRuntimeContext.attach/detach inline this body."""
    try:
        span: Any = context.get(_SPAN_KEY)
        if span is None:
            record = _INVALID
        else:
            hit = _cache.get(id(span))
            if hit is not None and hit[0] is span.get_span_context():
                record = hit[1]
            else:
                record = _remember(span)
        try:
            _tls.view[:] = record
        except AttributeError:
            _claim_current()[:] = record
    except Exception:  # noqa: BLE001 - never raise into the app
        _failed()


def _failed() -> None:
    """Count a hot-path failure and publish "no context" rather than a stale one."""
    try:
        if _table is not None:
            _table.errors += 1
        _tls.view[:] = _INVALID
    except Exception:  # noqa: BLE001, S110 - never raise into the app
        pass


def publish_entered(entered: contextvars.Context) -> None:
    """Publish the span current in ``entered``: a contextvars Context that this
    thread is about to run code in with no OpenTelemetry attach (an event-loop
    step, a worker thread's copied context; otel_gil/event_loop.py). Never raises."""
    try:
        var = _otel_var
        otel = entered.get(var) if var is not None else None
        span: Any = otel.get(_SPAN_KEY) if otel is not None else None
        if span is None:
            record = _INVALID
        else:
            hit = _cache.get(id(span))
            if hit is not None and hit[0] is span.get_span_context():
                record = hit[1]
            else:
                record = _remember(span)
        try:
            _tls.view[:] = record
        except AttributeError:
            _claim_current()[:] = record
    except Exception:  # noqa: BLE001 - never raise into the app
        _failed()


def publish_current(claim: bool = True) -> None:
    """Publish the span current in this thread's current contextvars Context
    again (a step ended: the loop's own code runs on). With claim=False, a
    thread that has no slot yet is left without one (a pool thread that never
    published has nothing stale to correct). Never raises."""
    if not claim and getattr(_tls, "view", None) is None:
        return
    var = _otel_var
    if var is not None:
        otel = var.get(None)
        _publish(otel if otel is not None else _EMPTY)
    else:
        try:
            _publish(otel_context.get_current())
        except Exception:  # noqa: BLE001 - never raise into the app
            _failed()


class PublishingRuntimeContext(_RuntimeContext):
    """Delegates to the app's runtime context, then publishes the now-current span."""

    def __init__(self, inner: _RuntimeContext) -> None:
        self.inner = inner
        self.enabled = True
        var = getattr(inner, "_current_context", None)
        if type(inner) is ContextVarsRuntimeContext and isinstance(var, ContextVar):
            # The default runtime context is these three ContextVar calls
            # (opentelemetry/context/contextvars_context.py); calling them directly
            # saves a Python frame on each attach and detach.
            self._attach: Callable[[Context], Any] = var.set
            self._detach: Callable[[Any], None] = var.reset
            self._get: Callable[[], Context] = var.get
            self.var: ContextVar[Context] | None = var
        else:
            self._attach, self._detach, self._get = inner.attach, inner.detach, inner.get_current
            self.var = None

    # attach() and detach() inline _publish(): a Python call costs ~70 ns here,
    # a tenth of the budget (bench/context_switch.py).
    def attach(self, context: Context) -> Any:
        token = self._attach(context)
        if self.enabled:
            try:
                span: Any = context.get(_SPAN_KEY)
                if span is None:
                    record = _INVALID
                else:
                    hit = _cache.get(id(span))
                    if hit is not None and hit[0] is span.get_span_context():
                        record = hit[1]
                    else:
                        record = _remember(span)
                try:
                    _tls.view[:] = record
                except AttributeError:
                    _claim_current()[:] = record
            except Exception:  # noqa: BLE001 - never raise into the app
                _failed()
        return token

    def get_current(self) -> Context:
        return self._get()

    def detach(self, token: Any) -> None:
        self._detach(token)
        if self.enabled:
            try:
                span: Any = self._get().get(_SPAN_KEY)
                if span is None:
                    record = _INVALID
                else:
                    hit = _cache.get(id(span))
                    if hit is not None and hit[0] is span.get_span_context():
                        record = hit[1]
                    else:
                        record = _remember(span)
                try:
                    _tls.view[:] = record
                except AttributeError:
                    _claim_current()[:] = record
            except Exception:  # noqa: BLE001 - never raise into the app
                _failed()


def install(slots: int = DEFAULT_SLOTS) -> ContextTable:
    """Create the table (once per process), hook OpenTelemetry's runtime context
    and publish the calling thread's current context. Idempotent. Threads with a
    context attached before install() publish it at their next attach/detach."""
    global _table, _otel_var
    if _table is None:
        _table = ContextTable(slots)
        os.register_at_fork(after_in_child=_after_fork)
    runtime = otel_context._RUNTIME_CONTEXT
    if isinstance(runtime, PublishingRuntimeContext):
        runtime.enabled = True
    else:
        runtime = otel_context._RUNTIME_CONTEXT = PublishingRuntimeContext(runtime)
    _otel_var = runtime.var
    _publish(otel_context.get_current())
    from otel_gil import event_loop  # noqa: PLC0415 - it imports this module

    event_loop.install()
    return _table


def uninstall() -> None:
    """Put the original runtime context back and mark every record invalid. The
    table stays mapped (the sidecar may hold its address); install() reuses it.
    If something else wrapped our hook meanwhile, the hook turns pass-through."""
    from otel_gil import event_loop  # noqa: PLC0415

    event_loop.uninstall()
    runtime = otel_context._RUNTIME_CONTEXT
    if isinstance(runtime, PublishingRuntimeContext):
        otel_context._RUNTIME_CONTEXT = runtime.inner
        runtime.enabled = False
    else:
        _disable_nested(runtime)
    if _table is not None:
        _table.clear_valid()


def _disable_nested(runtime: object) -> None:
    seen = 0
    while runtime is not None and seen < 16:
        if isinstance(runtime, PublishingRuntimeContext):
            runtime.enabled = False
        runtime = getattr(runtime, "inner", getattr(runtime, "_inner", None))
        seen += 1


def current_table() -> ContextTable | None:
    return _table


def _after_fork() -> None:
    """In a forked child only the forking thread exists, under a new tid: forget
    the parent's slots and let this thread claim afresh."""
    if _table is None:
        return
    _table.reset()
    for name in ("view", "lease"):
        _tls.__dict__.pop(name, None)
    _cache.clear()  # in place: otel_gil/event_loop.py holds this dict
    _cached_ids.clear()
    if isinstance(otel_context._RUNTIME_CONTEXT, PublishingRuntimeContext):
        _publish(otel_context.get_current())


# ------------------------------------------------------------ the sidecar side


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


def read_memory(pid: int, address: int, length: int) -> bytes:
    """Read another process's memory through /proc/PID/mem."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            data = mem.read(length)
    except PermissionError as err:
        raise TargetError(f"cannot read the memory of process {pid}: {err}",
                          "run as root, as the same user, or with CAP_SYS_PTRACE") from err
    except (OSError, ValueError) as err:
        raise TargetError(f"cannot read {length} bytes at {address:#x} in process {pid}: {err}",
                          "check the pid and that the process is still running") from err
    if len(data) != length:
        raise TargetError(f"short read at {address:#x} in process {pid}",
                          "the process may have exited or unmapped its context table")
    return data


class InvalidTable(TargetError):
    """What is at a context table's address is not one (or no longer one)."""


def parse_slots(raw: bytes) -> list[SlotRecord]:
    """Decode a table image (header and slots): the occupied slots."""
    magic, version, slots, slot_size, header_size = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC or version != VERSION or slot_size != SLOT_SIZE or \
            header_size != HEADER_SIZE or slots & (slots - 1):
        raise InvalidTable("no otel-gil context table at that address",
                          "pass the address printed by otel_gil.context.install()")
    records = []
    for index in range(slots):
        offset = HEADER_SIZE + index * SLOT_SIZE
        if offset + SLOT_SIZE > len(raw):
            break
        tid, gone, ident, trace_id, span_id, valid, flags, size = \
            _SLOT_HEAD.unpack_from(raw, offset)
        if tid == 0:
            continue
        name = _thread_name(raw[offset + _ATTRS_OFFSET:offset + SLOT_SIZE], size)
        records.append(SlotRecord(tid, ident, trace_id, span_id, valid, flags, name, bool(gone)))
    return records


def _thread_name(attrs: bytes, size: int) -> str:
    pos, end = 0, min(size, len(attrs))
    while pos + 2 <= end:
        key, length = attrs[pos], attrs[pos + 1]
        if key == ATTR_THREAD_NAME:
            return printable(attrs[pos + 2:min(pos + 2 + length, end)].decode("utf-8", "replace"))
        pos += 2 + length
    return ""


def read_slots(pid: int, table_address: int, max_slots: int = 1 << 16) -> list[SlotRecord]:
    """The occupied slots of process pid's table, read via /proc/PID/mem. The table
    is the traced process's to write, so untrusted: a header claiming more than
    max_slots (the size it registered) is refused, and the slots may change while
    read (a torn slot only mislabels that process's own threads)."""
    header = read_memory(pid, table_address, HEADER_SIZE)
    slots = _HEADER.unpack_from(header, 0)[2]
    if slots == 0 or slots > max_slots:
        raise InvalidTable("no otel-gil context table at that address",
                          "pass the address printed by otel_gil.context.install()")
    return parse_slots(read_memory(pid, table_address, HEADER_SIZE + slots * SLOT_SIZE))


def read_counters(pid: int, table_address: int) -> tuple[int, int]:
    """The app's (unplaced, errors) counters from its table's header. Untrusted
    numbers: they only ever feed that app's own metrics."""
    header = read_memory(pid, table_address, HEADER_SIZE)
    if _HEADER.unpack_from(header, 0)[0] != MAGIC:
        raise TargetError("no otel-gil context table at that address",
                          "pass the address printed by otel_gil.context.install()")
    unplaced, errors = _COUNTERS.unpack_from(header, _COUNTERS_OFFSET)
    return int(unplaced), int(errors)


def read_thread_names(pid: int, table_address: int,
                      max_slots: int = 1 << 16) -> dict[int, tuple[int, str]]:
    """native tid (in the app's PID namespace) -> (Python ident, thread name)."""
    return {r.tid: (r.ident, r.thread_name) for r in read_slots(pid, table_address, max_slots)}
