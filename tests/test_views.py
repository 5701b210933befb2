"""The views of a record (otel_gil/views), on records built here with known
numbers: the held-while-others-waited arithmetic, and every writer's format
(folded, speedscope against its published schema, SVG, Chrome Trace Event
JSON, HTML). The same views on real probes: tests/test_views_record.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional

import pytest

from otel_gil import names, views
from otel_gil.cli import report
from otel_gil.views import blame, flame, html, svg, trace
from otel_gil.views.model import NOT_RECORDED, UNKNOWN_HOLDER, Frame, Share, Slice

MS = 1_000_000
T0 = 50_000 * MS  # the record's start (CLOCK_MONOTONIC ns)
PID = 4242
SPEEDSCOPE_SCHEMA = os.environ.get(
    "OTEL_GIL_SPEEDSCOPE_SCHEMA",
    "/var/cache/otel-gil/speedscope-1.25.0/file-format-schema.json")  # scripts/test.sh


def hold(tid: int, start: int, end: int, **extra: Any) -> Dict[str, Any]:
    return dict({"tid": tid, "start_ns": T0 + start, "end_ns": T0 + end}, **extra)


def wait(tid: int, start: int, end: int, holds: List[Dict[str, Any]],
         truncated: bool = False) -> Dict[str, Any]:
    return {"kind": "wait", "pid": PID, "tid": tid, "start_ns": T0 + start, "end_ns": T0 + end,
            "duration_ns": end - start, "holders": [], "holders_truncated": truncated,
            "holds": holds}


def record(intervals: List[Dict[str, Any]], names_: Optional[Dict[int, str]] = None,
           **extra: Any) -> Dict[str, Any]:
    threads = names_ or {1: "holder", 2: "waiter-a", 3: "waiter-b"}
    doc = {"schema": "otel-gil/record/v1", "duration_ns": 1000 * MS, "lost_events": 0,
           "thresholds": {"wait_ns": MS, "hold_ns": 50 * MS},
           "processes": [{"pid": PID, "binary": "/usr/bin/python3.11", "version": "3.11.2",
                          "started_ns": T0}],
           "threads": [{"pid": PID, "tid": t, "name": n, "acquisitions": 1, "hold_ns": 0,
                        "wait_ns": 0, "hold_pct": 0.0, "wait_pct": 0.0, "max_wait_ns": 0,
                        "p99_wait_ns": 0} for t, n in threads.items()],
            "intervals": intervals}
    doc.update(extra)
    return doc


def convoy() -> Dict[str, Any]:
    """holder (1) holds twice for 300 ms; waiter-a (2) and waiter-b (3) wait behind
    each hold, then the GIL passes to them (a 1 ms hand-off gap before each return)."""
    ivs = []
    for k in range(2):
        base = 100 * MS + k * 400 * MS
        h = hold(1, base, base + 300 * MS)
        ivs.append(dict(h, kind="hold", pid=PID, duration_ns=300 * MS))
        ivs.append(wait(2, base + 10 * MS, base + 301 * MS, [h]))
        ivs.append(wait(3, base + 20 * MS, base + 305 * MS,
                        [hold(2, base + 301 * MS, base + 304 * MS), h]))
    return record(ivs)


# ------------------------------------------------------------------ arithmetic


def test_apportion_adds_up_exactly_and_gives_the_remainder_to_the_largest_fraction() -> None:
    # GIVEN 10 ns over parts 1:1:1 THEN 4/3/3 (the first of the tied remainders gets it)
    assert blame.apportion(10, [1, 1, 1]) == [4, 3, 3]
    # AND an exact split stays exact
    assert blame.apportion(1000, [6, 3, 1]) == [600, 300, 100]
    # AND whatever the parts, the sum is the total
    assert sum(blame.apportion(1_000_003, [7, 13, 29, 1])) == 1_000_003
    with pytest.raises(ValueError):
        blame.apportion(5, [0, 0])


def _wait(duration: int, shares: List[Share], truncated: bool = False) -> Slice:
    return Slice("wait", PID, 9, 0, duration, shares=tuple(shares), truncated=truncated)


A = (Frame("thread", "thread a"),)
B = (Frame("thread", "thread b"),)


def test_a_wait_is_split_over_its_holders_by_overlap() -> None:
    # GIVEN a 10 ms wait during which A held 6 ms and B 3 ms (1 ms of hand-off gaps)
    w = _wait(10 * MS, [Share(1, 6 * MS, A), Share(2, 3 * MS, B)])
    # WHEN it is charged THEN A gets 2/3 and B 1/3 of the whole 10 ms
    charged = {stack: ns for stack, _, ns in blame.charges(w)}
    assert charged == {A: 6_666_667, B: 3_333_333}
    assert sum(charged.values()) == 10 * MS


def test_an_unknown_holder_and_unrecorded_hand_offs_are_charged_to_synthetic_stacks() -> None:
    # GIVEN a wait with no known holder THEN all of it is "[holder unknown]"
    assert blame.charges(_wait(5 * MS, [])) == [(UNKNOWN_HOLDER, None, 5 * MS)]
    # GIVEN a truncated wait (more hand-offs than the probes carry) covered 4 of 10 ms
    w = _wait(10 * MS, [Share(1, 4 * MS, A)], truncated=True)
    # THEN the known holder gets its overlap, no more; the rest is "[holders not recorded]"
    assert blame.charges(w) == [(A, None, 4 * MS), (NOT_RECORDED, None, 6 * MS)]


def test_a_truncated_wait_takes_its_earliest_holders_from_other_recorded_holds() -> None:
    # GIVEN waiter-a (2) waiting 0-100 ms behind four holds: holder (1) -10-30 ms,
    # waiter-b (3) 30-40 ms, holder 40-70 ms (a long hold, an interval of its
    # own), and holder 71-100 ms, the only one its event kept (truncated)
    first, second = hold(1, -10 * MS, 30 * MS), hold(3, 30 * MS, 40 * MS)
    long_hold, kept = hold(1, 40 * MS, 70 * MS), hold(1, 71 * MS, 100 * MS)
    doc = record([
        wait(3, 5 * MS, 30 * MS, [first]),  # waiter-b's own wait carried the first hold
        wait(1, 31 * MS, 39 * MS, [second]),  # and the holder's carried waiter-b's
        dict(long_hold, kind="hold", pid=PID, duration_ns=30 * MS),
        wait(2, 0, 100 * MS, [kept], truncated=True),
        # AND a hold of another process at the same time, which must not count
        dict(hold(1, 0, 30 * MS), kind="hold", pid=PID + 1, duration_ns=30 * MS),
    ])
    rec = views.from_record(doc)
    w = next(s for s in rec.waits if s.tid == 2)
    # THEN its shares are the kept hold, then the recorded ones before it, each
    # once, clipped to the wait (the first began 10 ms before it)
    assert [(s.tid, s.held_ns, s.source) for s in w.shares] == [
        (1, 29 * MS, ("hold", 1, T0 + 71 * MS)),
        (1, 30 * MS, ("hold", 1, T0 - 10 * MS)),
        (3, 10 * MS, ("hold", 3, T0 + 30 * MS)),
        (1, 30 * MS, ("hold", 1, T0 + 40 * MS)),
    ]
    # AND only the 1 ms no recorded hold covers (70-71 ms) is "[holders not recorded]"
    charged = blame.charges(w)
    assert charged[-1] == (NOT_RECORDED, None, 1 * MS)
    assert sum(ns for _, _, ns in charged) == 100 * MS
    # AND the note says where the earliest holders came from
    assert any("the holds other waits and long holds recorded" in n
               for n in rec.notes)


def test_held_while_waited_on_a_convoy() -> None:
    # GIVEN two 300 ms holds, each waited on by waiter-a (291 ms) and waiter-b
    # (285 ms, of which 3 ms behind waiter-a's own short hold)
    rec = views.from_record(convoy())
    # WHEN aggregated
    top = views.held_while_waited(rec)
    # THEN the holder is charged all of waiter-a's waits and 280/283 of waiter-b's
    behind_a, behind_holder = blame.apportion(285 * MS, [3 * MS, 280 * MS])
    assert behind_holder == 281_978_799  # 285 * 280 / 283 ms, the remainder's unit to it
    assert [(b.stack[-1].function, b.waited_ns, b.waits) for b in top] == [
        ("thread holder", 2 * (291 * MS + behind_holder), 4),
        ("thread waiter-a", 2 * behind_a, 2),
    ]
    # AND the weights add up to every recorded wait, each ns charged once
    assert sum(b.waited_ns for b in top) == sum(s.duration_ns for s in rec.waits)


def test_a_hold_before_the_wait_is_charged_from_the_wait_start_and_the_waiter_never() -> None:
    # GIVEN a hold that began 1 s before the wait, and the waiter's own earlier hold
    doc = record([wait(2, 0, 10 * MS, [hold(1, -1000 * MS, 8 * MS), hold(2, -5 * MS, 1 * MS)])])
    rec = views.from_record(doc)
    # THEN the share is the 8 ms overlap, and the waiter itself has none
    (w,) = rec.waits
    assert [(s.tid, s.held_ns) for s in w.shares] == [(1, 8 * MS)]
    assert blame.charges(w)[0][2] == 10 * MS


# ------------------------------------------------------------------ the record


def test_one_hold_slice_per_hold_and_captured_stacks_plug_in() -> None:
    # GIVEN a hold interval carrying a captured stack (the format stack capture
    # will write), which also appears as a window in two waits
    stack = [{"kind": "native", "function": "usleep", "object": "/lib/libc.so.6"},
             {"kind": "python", "function": "hold_in_c", "file": "app.py", "line": 7}]
    h = hold(1, 0, 300 * MS)
    doc = record([dict(h, kind="hold", pid=PID, duration_ns=300 * MS, stack=stack),
                  wait(2, 10 * MS, 301 * MS, [h]), wait(3, 20 * MS, 302 * MS, [h])])
    rec = views.from_record(doc)
    # THEN there is one hold slice, and its stack is the captured one, then the thread
    holds = [s for s in rec.slices if s.kind == "hold"]
    assert len(holds) == 1
    assert [f.label() for f in holds[0].stack] == [
        "usleep [libc.so.6]", "hold_in_c (app.py:7)", "thread holder"]
    # AND both waits are charged to that stack: folded shows it outermost first
    assert flame.folded(rec) == "thread holder;hold_in_c (app.py:7);usleep [libc.so.6] 573000\n"


def test_a_record_says_what_it_lacks() -> None:
    # GIVEN lost events, a record bound that dropped intervals, a truncated wait
    doc = record([wait(2, 0, 10 * MS, [hold(1, 0, 4 * MS)], truncated=True)],
                 lost_events=3, intervals_dropped=7)
    rec = views.from_record(doc)
    # THEN each is a note, and every view and the table carry the notes
    assert len(rec.notes) == 3
    assert "3 events were lost" in rec.notes[0]
    assert "truncated: 7 waits and holds" in rec.notes[1]
    assert "1 of 1 waits saw more hand-offs" in rec.notes[2]
    assert "3 events were lost" in svg.render(rec)
    assert "3 events were lost" in html.page(rec)
    assert trace.timeline(rec)["otherData"]["notes"] == rec.notes
    assert "3 events were lost" in flame.speedscope(rec)["profiles"][0]["name"]
    assert "note: the record was truncated" in report.holders_table(rec)


def test_a_malformed_record_is_refused_and_hostile_names_are_neutralised() -> None:
    with pytest.raises(ValueError, match="not an otel-gil record"):
        views.from_record({"schema": "something else"})
    with pytest.raises(ValueError, match="start_ns is not an integer"):
        views.from_record(record([{"kind": "wait", "pid": 1, "tid": 2, "start_ns": "x"}]))
    with pytest.raises(ValueError, match="is not an integer in not a hold"):
        views.from_record(record([wait(2, 0, 5 * MS, ["not a hold"])]))  # type: ignore[list-item]
    # GIVEN a thread named with a terminal escape and markup
    doc = record([wait(2, 0, 10 * MS, [hold(1, 0, 9 * MS)])],
                 {1: "\x1b[2J</script><b>x", 2: "w"})
    rec = views.from_record(doc)
    # THEN the control character is gone, and no view lets the markup through
    assert rec.threads[1].name == "?[2J</script><b>x"
    page = html.page(rec)
    assert "</script><b>" not in page and "<b>x" not in page
    ET.fromstring(svg.render(rec))  # still well-formed XML


# ------------------------------------------------------------------ writers


def test_folded_is_outermost_first_weighted_in_microseconds() -> None:
    rec = views.from_record(convoy())
    lines = flame.folded(rec).splitlines()
    # 2 x (291 + 285 * 280/283) ms and 2 x 285 * 3/283 ms, in µs
    assert lines == ["thread holder 1145958", "thread waiter-a 6042"]
    # AND a ';' in a name cannot split a frame
    odd = views.from_record(record([wait(2, 0, 5 * MS, [hold(1, 0, 5 * MS)])], {1: "a;b", 2: "w"}))
    assert flame.folded(odd) == "thread a,b 5000\n"


def test_speedscope_matches_its_schema_and_the_folded_weights() -> None:
    rec = views.from_record(convoy())
    doc = json.loads(flame.speedscope_text(rec))
    # THEN (by hand) the fields speedscope requires, one sampled profile in µs
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    (profile,) = doc["profiles"]
    assert profile["type"] == "sampled" and profile["unit"] == "microseconds"
    assert len(profile["samples"]) == len(profile["weights"])
    assert profile["endValue"] == sum(profile["weights"])
    frames = doc["shared"]["frames"]
    assert all(isinstance(f["name"], str) for f in frames)
    # AND each sample, root first, is a folded line with the same weight
    folded = {tuple(line.rsplit(" ", 1)[0].split(";")): int(line.rsplit(" ", 1)[1])
              for line in flame.folded(rec).splitlines()}
    got = {tuple(frames[i]["name"] for i in s): w
           for s, w in zip(profile["samples"], profile["weights"])}
    assert got == folded
    # AND it validates against speedscope's published schema
    if not os.path.exists(SPEEDSCOPE_SCHEMA):
        message = f"{SPEEDSCOPE_SCHEMA} is missing (scripts/test.sh fetches it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    import jsonschema

    with open(SPEEDSCOPE_SCHEMA) as f:
        jsonschema.validate(doc, json.load(f))


def _svg_frames(text: str) -> List[Dict[str, Any]]:
    ns = {"s": "http://www.w3.org/2000/svg"}
    root = ET.fromstring(text)
    out = []
    for g in root.iterfind(".//s:g[@class='frame']", ns):
        rect, title, label = g.find("s:rect", ns), g.find("s:title", ns), g.find("s:text", ns)
        assert rect is not None and title is not None and title.text
        out.append({"kind": g.get("data-kind"), "title": title.text,
                    "width": float(rect.get("width", 0)), "y": float(rect.get("y", 0)),
                    "label": label.text if label is not None else None})
    return out


def test_flame_graph_svg_frames_are_as_wide_as_their_weight() -> None:
    # GIVEN a convoy, with a captured stack on the first hold
    doc = convoy()
    doc["intervals"][0]["stack"] = [{"kind": "python", "function": "ext", "file": "a.py",
                                     "line": 3}]
    rec = views.from_record(doc)
    text = svg.render(rec)
    # THEN it is a standalone SVG: no script, no external reference
    assert "<script" not in text and "href" not in text
    frames = _svg_frames(text)
    by_label = {f["title"].split("\n")[0]: f for f in frames}
    # AND every frame has a hover title; the root spans the whole width
    assert set(by_label) == {"all holders", "thread holder", "thread waiter-a",
                             "ext (a.py:3)"}
    root = by_label["all holders"]
    assert root["width"] == pytest.approx(svg.WIDTH - 2 * svg.PAD, abs=0.01)
    total = sum(s.duration_ns for s in rec.waits)
    for label, ns in [(" ".join(p[-1:]), n) for p, n in flame.paths(flame.tree(rec))]:
        assert by_label[label]["width"] == pytest.approx(root["width"] * ns / total, abs=0.01)
    # AND the captured frame sits on top of its thread; labels fit their frame
    assert by_label["ext (a.py:3)"]["y"] < by_label["thread holder"]["y"] < root["y"]
    for f in frames:
        if f["label"]:
            assert len(f["label"]) * svg.CHAR_W <= f["width"]


def test_flame_graph_labels_are_cut_to_fit() -> None:
    assert svg.fit("abcdefghij", 200) == "abcdefghij"
    assert svg.fit("abcdefghijklmnop", 6 + 8 * svg.CHAR_W) == "abcdef.."
    assert svg.fit("abcdefghij", 20) == ""


def _check_trace_event(e: Dict[str, Any]) -> None:
    """Required fields and types of the Trace Event Format's events we write."""
    assert isinstance(e["name"], str) and isinstance(e["ph"], str)
    assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
    if e["ph"] == "M":
        assert e["name"] in ("process_name", "thread_name", "thread_sort_index")
        assert isinstance(e["args"], dict)
    elif e["ph"] == "X":
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
        assert e["dur"] >= 0 and isinstance(e["cat"], str) and isinstance(e["args"], dict)
    elif e["ph"] in ("s", "f"):
        assert isinstance(e["id"], int) and isinstance(e["ts"], (int, float))
        assert e["cat"] == names.VIEW_CATEGORY.name
        if e["ph"] == "f":
            assert e["bp"] == "e"
    else:
        raise AssertionError(f"unexpected phase {e['ph']}")


def test_timeline_is_trace_event_json_consistent_with_the_record() -> None:
    doc = convoy()
    rec = views.from_record(doc)
    tl = json.loads(trace.timeline_text(rec))
    events = tl["traceEvents"]
    for e in events:
        _check_trace_event(e)
    origin = tl["otherData"]["origin_ns"]
    assert origin == T0
    # THEN one named track per thread
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {1: "holder", 2: "waiter-a", 3: "waiter-b"}
    # AND each wait of the record is one slice, ts/dur in µs matching its ns to the ns
    slices = [e for e in events if e["ph"] == "X"]
    waits = [e for e in slices if e["name"] == names.GIL_WAIT.name]
    want = sorted((iv["tid"], iv["start_ns"], iv["end_ns"]) for iv in doc["intervals"]
                  if iv["kind"] == "wait")
    got = sorted((e["tid"], round(e["ts"] * 1000) + origin,
                  round((e["ts"] + e["dur"]) * 1000) + origin) for e in waits)
    assert got == want
    # AND each hold once (the 300 ms holds, waiter-a's short one), its stack in its args
    holds = [e for e in slices if e["name"] == names.GIL_HOLD.name]
    assert sorted((e["tid"], e["dur"]) for e in holds) == [(1, 300_000.0), (1, 300_000.0),
                                                           (2, 3000.0), (2, 3000.0)]
    assert all(e["args"][names.VIEW_ARG_STACK.name][-1].startswith("thread ") for e in holds)
    assert all(e["args"]["start_ns"] == round(e["ts"] * 1000) + origin for e in slices)
    # AND one arrow per (hold, wait it overlapped): s inside the hold, f inside the wait
    _check_flows(events)


def _enclosing(slices: List[Dict[str, Any]], tid: int, ts: float) -> List[Dict[str, Any]]:
    return [e for e in slices if e["tid"] == tid and e["ts"] < ts < e["ts"] + e["dur"]]


def _check_flows(events: List[Dict[str, Any]]) -> None:
    slices = [e for e in events if e["ph"] == "X"]
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts and set(starts) == set(ends)
    for flow_id, s in starts.items():
        f = ends[flow_id]
        (hold_,) = _enclosing(slices, s["tid"], s["ts"])
        (wait_,) = _enclosing(slices, f["tid"], f["ts"])
        assert hold_["name"] == names.GIL_HOLD.name and wait_["name"] == names.GIL_WAIT.name
        assert s["tid"] != f["tid"]


def test_timeline_flows_on_the_convoy() -> None:
    events = trace.events(views.from_record(convoy()))
    # THEN 6 arrows: each 300 ms hold to both waits, waiter-a's short hold to waiter-b
    assert sum(1 for e in events if e["ph"] == "s") == 6


def test_html_is_self_contained_and_carries_timeline_and_flame_graph() -> None:
    rec = views.from_record(convoy())
    page = html.page(rec)
    # THEN nothing is fetched: no src/href to anything, a CSP that forbids it
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "default-src 'none'" in page
    assert page.count("<svg") == 2  # the timeline's (drawn by the script), the flame graph
    # AND the embedded data is the timeline: 3 threads, 4 holds + 4 waits, 6 flows
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>',
                                page, re.S).group(1))  # type: ignore[union-attr]
    assert [t["name"] for t in data["threads"]] == ["holder", "waiter-a", "waiter-b"]
    assert sorted(s[0] for s in data["slices"]) == [0] * 4 + [1] * 4
    assert len(data["flows"]) == 6 and len(data["tips"]) == len(data["slices"])
    assert "Top holders while others waited" in page and "thread holder" in page


def test_record_table_has_top_holders() -> None:
    text = report.holders_table(views.from_record(convoy()))
    lines = text.splitlines()
    assert lines[0].startswith("Top holders while others waited (1152.00 ms")
    assert re.match(r"\s+1\.\d{4} s\s+9\d\.\d%\s+4 waits  thread holder$", lines[1])
    assert "thread waiter-a" in lines[2]


def test_write_replaces_whole_files(tmp_path: Any) -> None:
    rec = views.from_record(convoy())
    files = {kind: str(tmp_path / f"v.{kind}") for kind in views.RENDERERS}
    views.write(rec, files)
    for kind, path in files.items():
        with open(path) as f:
            assert f.read() == views.render(kind, rec)
    assert sorted(os.listdir(tmp_path)) == sorted(f"v.{k}" for k in views.RENDERERS)


@pytest.mark.parametrize("flag", ["--flamegraph", "--folded", "--speedscope", "--timeline",
                                  "--html"])
def test_a_view_path_that_cannot_be_written_is_refused_before_tracing(flag: str) -> None:
    # GIVEN a view file in a directory that does not exist
    proc = subprocess.run([sys.executable, "-m", "otel_gil", "record", "--pid", "1",
                           flag, "/nonexistent-dir/out"], capture_output=True, text=True,
                          timeout=60)
    # THEN one line says so, before anything is traced
    assert proc.returncode == 2
    assert f"argument {flag}: no directory '/nonexistent-dir'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------ from spans (demo)


def _gil_span(name: str, span_id: str, parent: str, tid: int, thread: str, start_ms: float,
              end_ms: float, holders: Optional[List[Any]] = None,
              links: Optional[List[Any]] = None) -> Any:
    from otel_gil.dev.receiver import SpanRecord

    attrs: Dict[str, Any] = {names.THREAD_NAME.name: thread, names.THREAD_HOST_ID.name: tid,
                             names.PROCESS_HOST_PID.name: PID}
    if holders is not None:
        attrs[names.HOLDER_TIDS.name] = [t for t, _, _ in holders]
        attrs[names.HOLDER_NAMES.name] = [n for _, n, _ in holders]
        attrs[names.HOLDER_HELD_NS.name] = [int(ms * MS) for _, _, ms in holders]
        attrs[names.HOLDERS_TRUNCATED.name] = False
    return SpanRecord(trace_id="a" * 32, span_id=span_id, parent_span_id=parent, name=name,
                      start_ns=int(start_ms * MS), end_ns=int(end_ms * MS), attributes=attrs,
                      links=[("b" * 32, s, {names.LINK_ROLE.name: "holder",
                                            names.LINK_HELD_NS.name: int(ms * MS)})
                             for s, ms in links or []],
                      resource={}, scope="s", kind=1)


def test_from_spans_charges_waits_to_the_holders_span_and_thread() -> None:
    from otel_gil.dev.receiver import SpanRecord

    # GIVEN a /light request's 10 ms wait: thread 7 held 8 ms of it, 6 ms of those
    # in its GET /cpu span (linked); thread 8 held 2 ms outside any span
    cpu = SpanRecord(trace_id="b" * 32, span_id="c1", parent_span_id="", name="GET /cpu",
                     start_ns=0, end_ns=40 * MS, attributes={}, links=[], resource={},
                     scope="s", kind=2)
    spans = [cpu,
             _gil_span(names.GIL_WAIT.name, "w1", "l1", 5, "T-light", 10, 20,
                       holders=[(7, "T-cpu", 8), (8, "T-x", 2)], links=[("c1", 6)]),
             # the /cpu request's own wait tells which thread c1 ran on
             _gil_span(names.GIL_WAIT.name, "w2", "c1", 7, "T-cpu", 30, 32,
                       holders=[(5, "T-light", 2)])]
    rec = views.from_spans(spans)
    # THEN the wait is charged 6 ms to "span GET /cpu" on T-cpu, 2 ms to T-cpu, 2 to T-x
    by_path = {tuple(f.function for f in reversed(b.stack)): b.waited_ns
               for b in views.held_while_waited(rec)}
    assert by_path == {("thread T-cpu", "span GET /cpu"): 6 * MS, ("thread T-cpu",): 2 * MS,
                       ("thread T-x",): 2 * MS, ("thread T-light",): 2 * MS}
    # AND the holder's span is a slice on its thread, the arrow's start
    (span_slice,) = [s for s in rec.slices if s.kind == "span"]
    assert (span_slice.tid, span_slice.name) == (7, "GET /cpu")
    data = html.data(rec)
    assert [(data["slices"][a][0], data["slices"][b][0]) for a, b, _, _ in data["flows"]] == \
        [(2, 1)]
    assert rec.notes[0].startswith("built from the spans received")
