"""The ctypes mirror in otel_gil/abi/events.py against bpf/gil.h, compiled by gcc."""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path
from typing import Dict, Type

import pytest

from otel_gil.abi import events, slots
from otel_gil.probes.config import bpf_dir

STRUCTS: Dict[str, Type[ctypes.Structure]] = {
    "thread_ctx": slots.ThreadCtx,
    "ctx_slot_head": slots.CtxSlotHead,
    "gil_hold": events.GilHold,
    "gil_event": events.GilEvent,
    "thread_stats": events.ThreadStats,
    "target": events.TargetState,
    "holder_stats": events.HolderStats,
    "holder_slot": events.HolderSlot,
    "gil_pyframe": events.GilPyFrame,
    "gil_stack": events.GilStack,
}
CONSTANTS = ["GIL_HIST_MIN_SHIFT", "GIL_HIST_BUCKETS", "GIL_MAX_HOLDERS", "GIL_HOLD_RING",
             "GIL_HOLDER_SLOTS", "GIL_PID_WORDS",
             "GIL_CTX_HEADER_SIZE", "GIL_CTX_SLOT_SIZE", "GIL_CTX_PROBES",
             "GIL_EVENT_WAIT", "GIL_EVENT_HOLD", "GIL_SET_CONTENDED", "GIL_SET_ALL",
             "GIL_NS_TID", "GIL_START_SEEN", "GIL_TID_NATIVE", "GIL_TID_PTHREAD",
             "GIL_EVENT_STACK", "GIL_MAX_PYFRAMES", "GIL_STACK_CHUNK", "GIL_STACK_CHUNKS"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, int]:
    """Sizes, offsets and constants as gcc sees gil.h, as one JSON object."""
    lines = []
    for cname, cls in STRUCTS.items():
        lines.append(f'printf("\\"{cname}\\": %zu,\\n", sizeof(struct {cname}));')
        for field, *_ in cls._fields_:
            lines.append(f'printf("\\"{cname}.{field}\\": %zu,\\n", '
                         f'offsetof(struct {cname}, {field}));')
    for const in CONSTANTS:
        lines.append(f'printf("\\"{const}\\": %d,\\n", (int){const});')
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include \"gil.h\"\nint main(void) {\n"
           'printf("{\\n");\n' + "\n".join(lines) + '\nprintf("\\"end\\": 0}\\n");\nreturn 0;\n}\n')
    tmp = tmp_path_factory.mktemp("layout")
    (tmp / "layout.c").write_text(src)
    exe = tmp / "layout"
    subprocess.run(["gcc", f"-I{bpf_dir()}", "-o", str(exe), str(tmp / "layout.c")], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("cname", list(STRUCTS))
def test_struct_matches_header(layout: Dict[str, int], cname: str) -> None:
    cls = STRUCTS[cname]
    assert ctypes.sizeof(cls) == layout[cname]
    for field, *_ in cls._fields_:
        assert getattr(cls, field).offset == layout[f"{cname}.{field}"], field


def test_constants_match_header(layout: Dict[str, int]) -> None:
    for const in CONSTANTS:
        module = slots if const.startswith("GIL_CTX_") else events
        assert getattr(module, const) == layout[const], const


def test_slot_offsets_come_from_the_checked_mirror() -> None:
    # GIVEN the slot head as gcc laid it out (checked above) WHEN the app's and
    # the sidecar's struct formats are derived from it THEN they agree with it
    head = slots.CtxSlotHead
    assert slots.SLOT_HEAD.size == slots.ATTRS_OFFSET == slots.ctypes.sizeof(head)
    assert slots.IDS_OFFSET == head.ctx.offset
    assert slots.VALID_OFFSET == head.ctx.offset + slots.ThreadCtx.valid.offset
    assert slots.IDS_SIZE == len(slots.ids_record(1, 2, 1)) == \
        slots.ThreadCtx.attrs_data_size.offset
    # AND a slot packed with the struct format reads back through the ctypes mirror
    raw = slots.SLOT_HEAD.pack(7, 1, 99, (5).to_bytes(16, "big"), (6).to_bytes(8, "big"), 1, 1, 3)
    back = head.from_buffer_copy(raw)
    assert (back.tid, back.reserved, back.ident, back.ctx.valid, back.ctx.attrs_data_size) == \
        (7, 1, 99, 1, 3)
    assert events.decode_ctx(back.ctx) == events.SpanRef(5, 6, 1)


def test_decode_wait_event_round_trip() -> None:
    # GIVEN a raw wait event with a valid context and two holds
    ev = events.GilEvent()
    ev.kind, ev.pid, ev.tid, ev.nholds = events.GIL_EVENT_WAIT, 10, 11, 2
    ev.probe_set = events.GIL_SET_ALL
    ev.start_ns, ev.end_ns, ev.holds_total = 1000, 6000, 2
    ctypes.memmove(ev.ctx.trace_id, (0xABC).to_bytes(16, "big"), 16)
    ctypes.memmove(ev.ctx.span_id, (0xDEF).to_bytes(8, "big"), 8)
    ev.ctx.valid, ev.ctx.trace_flags = 1, 1
    ev.holds[0].tid, ev.holds[0].start_ns, ev.holds[0].end_ns = 12, 3000, 6000
    ev.holds[1].tid, ev.holds[1].start_ns, ev.holds[1].end_ns = 13, 500, 3000
    # WHEN decoded THEN every field comes back
    iv = events.decode_event(bytes(ev))
    assert (iv.kind, iv.pid, iv.tid, iv.start_ns, iv.end_ns) == ("wait", 10, 11, 1000, 6000)
    assert iv.span == events.SpanRef(0xABC, 0xDEF, 1)
    assert [(h.tid, h.start_ns, h.end_ns) for h in iv.holds] == [(12, 3000, 6000), (13, 500, 3000)]
    assert iv.holds_total == 2
    assert iv.probe_set == "all"


def test_unparented_waits_are_told_apart_without_decoding() -> None:
    # GIVEN waits under a sampled span, an unsampled one, a valid record with no
    # ids, none; and a hold with no span
    def event(kind: int, valid: int, flags: int, ids: bool = True) -> bytes:
        ev = events.GilEvent()
        ev.kind, ev.pid, ev.tid, ev.nholds = kind, 10, 11, 1
        ev.probe_set, ev.start_ns, ev.end_ns = events.GIL_SET_ALL, 1, 9
        if ids:
            ctypes.memmove(ev.ctx.trace_id, (0xABC).to_bytes(16, "big"), 16)
            ctypes.memmove(ev.ctx.span_id, (0xDEF).to_bytes(8, "big"), 8)
        ev.ctx.valid, ev.ctx.trace_flags = valid, flags
        return bytes(ev)

    wait = events.GIL_EVENT_WAIT
    raws = [event(wait, 1, 1), event(wait, 1, 0), event(wait, 1, 1, ids=False),
            event(wait, 0, 1), event(events.GIL_EVENT_HOLD, 0, 0)]
    # WHEN peeked at THEN only waits no span can be made of are named, with
    # whether they were in a span, as the full decoder sees them
    assert [events.unparented_wait(r) for r in raws] == [None, (10, True), (10, False),
                                                         (10, False), None]
    for raw in raws[:4]:
        span = events.decode_event(raw).span
        assert (span is not None and span.sampled) == (events.unparented_wait(raw) is None)
    assert events.unparented_wait(raws[1][:20]) is None  # too short: the decoder's to reject
    unknown = bytearray(raws[1])
    events.GilEvent.from_buffer(unknown).probe_set = 99  # the decoder's to reject too
    assert events.unparented_wait(bytes(unknown)) is None


def test_decode_translates_tids_read_from_the_target() -> None:
    # GIVEN a contended hold event whose tid was read from the holder's tstate
    # (the target's namespace) and a wait whose second holder was too
    hold = events.GilEvent()
    hold.kind, hold.pid, hold.tid, hold.probe_set = events.GIL_EVENT_HOLD, 10, 7, \
        events.GIL_SET_CONTENDED
    hold.flags = events.GIL_NS_TID | events.GIL_START_SEEN
    wait = events.GilEvent()
    wait.kind, wait.pid, wait.tid, wait.nholds, wait.probe_set = events.GIL_EVENT_WAIT, 10, 11, 2, \
        events.GIL_SET_CONTENDED
    wait.holds[0].tid, wait.holds[1].tid = 12, 7
    wait.holds[1].flags = events.GIL_NS_TID
    # WHEN decoded with a namespace map (ns tid 7 is host tid 1007)
    def host(pid: int, ns_tid: int) -> int:
        return {(10, 7): 1007}.get((pid, ns_tid), ns_tid)

    h = events.decode_event(bytes(hold), host)
    w = events.decode_event(bytes(wait), host)
    # THEN only the tids read from the target are translated
    assert (h.tid, h.start_seen, h.probe_set) == (1007, True, "contended")
    assert [x.tid for x in w.holds] == [12, 1007] and w.tid == 11


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        events.decode_event(b"\0" * 8)
    bad = events.GilEvent()
    bad.kind = 99
    with pytest.raises(ValueError):
        events.decode_event(bytes(bad))
    bad.kind = events.GIL_EVENT_WAIT  # a known kind, an unknown probe set
    with pytest.raises(ValueError):
        events.decode_event(bytes(bad))


def test_invalid_context_decodes_to_none() -> None:
    assert events.decode_ctx(slots.ThreadCtx()) is None


def test_header_is_package_data() -> None:
    assert (Path(str(bpf_dir())) / "gil.h").is_file()
    assert (Path(str(bpf_dir())) / "gil.bpf.c").is_file()


def test_a_holds_context_decodes_from_its_own_place() -> None:
    # GIVEN a wait event with one hold whose context is valid, the waiter's not
    ev = events.GilEvent()
    ev.kind, ev.nholds, ev.probe_set = events.GIL_EVENT_WAIT, 1, events.GIL_SET_ALL
    ev.holds[0].tid, ev.holds[0].start_ns, ev.holds[0].end_ns = 7, 1, 2
    ctypes.memmove(ev.holds[0].ctx.trace_id, (0x1234).to_bytes(16, "big"), 16)
    ctypes.memmove(ev.holds[0].ctx.span_id, (0x5678).to_bytes(8, "big"), 8)
    ev.holds[0].ctx.valid, ev.holds[0].ctx.trace_flags = 1, 1
    # WHEN it is decoded THEN the hold carries its span and the wait none
    iv = events.decode_event(bytes(ev))
    assert iv.holds == (events.Hold(7, 1, 2, events.SpanRef(0x1234, 0x5678, 1)),)
    assert iv.span is None


def test_struct_formats_match_the_ctypes_mirrors() -> None:
    # the fast decoder's formats lay the fields where gil.h (via ctypes) has them
    assert events.EVENT_HEAD.size == events.GilEvent.holds.offset
    assert events.EVENT_HOLD.size == ctypes.sizeof(events.GilHold)
    assert events.EVENT_SIZE == events.EVENT_HEAD.size + \
        events.GIL_MAX_HOLDERS * events.EVENT_HOLD.size


def test_fast_decode_agrees_with_ctypes_on_random_events() -> None:
    import random

    def tr(pid: int, ns_tid: int) -> int:  # a namespace map: every ns tid moves
        return ns_tid + 1_000_000

    rng = random.Random(7)
    for _ in range(200):
        # GIVEN an event of random bytes, with a valid kind, probe set and count
        raw = bytearray(rng.randbytes(events.EVENT_SIZE))
        ev = events.GilEvent.from_buffer(raw)
        ev.kind = rng.choice([events.GIL_EVENT_WAIT, events.GIL_EVENT_HOLD])
        ev.probe_set = rng.choice(list(events.PROBE_SETS))
        ev.nholds = rng.randrange(0, 40)
        ev.ctx.valid = rng.randrange(2)
        del ev
        # WHEN decoded THEN every field is the ctypes mirror's
        ref = events.GilEvent.from_buffer_copy(bytes(raw))
        iv = events.decode_event(bytes(raw), tr)
        own = ref.tid + 1_000_000 if ref.flags & events.GIL_NS_TID else ref.tid
        assert (iv.pid, iv.tid, iv.start_ns, iv.end_ns, iv.holds_total) == \
            (ref.pid, own, ref.start_ns, ref.end_ns, ref.holds_total)
        assert iv.span == events.decode_ctx(ref.ctx)
        assert iv.start_seen == bool(ref.flags & events.GIL_START_SEEN)
        n = min(ref.nholds, events.GIL_MAX_HOLDERS)
        assert len(iv.holds) == n
        for h, r in zip(iv.holds, ref.holds[:n]):
            tid = r.tid + 1_000_000 if r.flags & events.GIL_NS_TID else r.tid
            assert h == events.Hold(tid, r.start_ns, r.end_ns, events.decode_ctx(r.ctx),
                                    bool(r.flags & events.GIL_START_SEEN))
        seqs = (ref.stack_seq,) if ref.kind == events.GIL_EVENT_HOLD else \
            tuple(r.stack_seq for r in ref.holds[:n])
        assert iv.stack_seqs == (seqs if any(seqs) else ())
