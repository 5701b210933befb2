"""The ctypes mirror in otel_gil/events.py against bpf/gil.h, compiled by gcc."""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path
from typing import Dict, Type

import pytest

from otel_gil import events
from otel_gil.probes import bpf_dir

STRUCTS: Dict[str, Type[ctypes.Structure]] = {
    "thread_ctx": events.ThreadCtx,
    "ctx_slot_head": events.CtxSlotHead,
    "gil_hold": events.GilHold,
    "gil_event": events.GilEvent,
    "thread_stats": events.ThreadStats,
    "target": events.Target,
}
CONSTANTS = ["GIL_HIST_MIN_SHIFT", "GIL_HIST_BUCKETS", "GIL_MAX_HOLDERS", "GIL_HOLD_RING",
             "GIL_CTX_HEADER_SIZE", "GIL_CTX_SLOT_SIZE", "GIL_CTX_PROBES",
             "GIL_EVENT_WAIT", "GIL_EVENT_HOLD"]


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
        assert getattr(events, const) == layout[const], const


def test_decode_wait_event_round_trip() -> None:
    # GIVEN a raw wait event with a valid context and two holds
    ev = events.GilEvent()
    ev.kind, ev.pid, ev.tid, ev.nholds = events.GIL_EVENT_WAIT, 10, 11, 2
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


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        events.decode_event(b"\0" * 8)
    bad = events.GilEvent()
    bad.kind = 99
    with pytest.raises(ValueError):
        events.decode_event(bytes(bad))


def test_invalid_context_decodes_to_none() -> None:
    assert events.decode_ctx(events.ThreadCtx()) is None


def test_header_is_package_data() -> None:
    assert (Path(str(bpf_dir())) / "gil.h").is_file()
    assert (Path(str(bpf_dir())) / "gil.bpf.c").is_file()


def test_struct_formats_match_the_ctypes_mirrors() -> None:
    # GIVEN the struct formats decode_event unpacks with
    # THEN they have the sizes and the holds' offset of the ctypes structs checked above
    assert events.EVENT_HEAD.size == events.GilEvent.holds.offset
    assert events.EVENT_HOLD.size == ctypes.sizeof(events.GilHold)
    # AND a hold's context decodes from its own place
    ev = events.GilEvent()
    ev.kind, ev.nholds = events.GIL_EVENT_WAIT, 1
    ev.holds[0].tid, ev.holds[0].start_ns, ev.holds[0].end_ns = 7, 1, 2
    ctypes.memmove(ev.holds[0].ctx.trace_id, (0x1234).to_bytes(16, "big"), 16)
    ctypes.memmove(ev.holds[0].ctx.span_id, (0x5678).to_bytes(8, "big"), 8)
    ev.holds[0].ctx.valid, ev.holds[0].ctx.trace_flags = 1, 1
    iv = events.decode_event(bytes(ev))
    assert iv.holds == (events.Hold(7, 1, 2, events.SpanRef(0x1234, 0x5678, 1)),)
    assert iv.span is None
