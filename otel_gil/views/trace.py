"""The timeline as Chrome Trace Event JSON (the "JSON Object Format" of the
Trace Event Format document; opens in ui.perfetto.dev and chrome://tracing).

- One track per thread: `process_name`/`thread_name` metadata events ("M").
- Holds and waits as complete events ("X"), `ts`/`dur` in microseconds from
  the record's start (`otherData.origin_ns`), to the nanosecond (3 decimals):
  ts * 1000 + origin_ns is the record's start_ns.
- A flow arrow from each hold to each wait it overlapped: a flow start ("s")
  inside the hold, on the holder's track, and a flow end ("f") inside the wait
  with "bp": "e", so both bind to the slice that encloses them (a flow end
  binds to the *next* slice by default).
- The holder's stack in the slice's args, innermost first.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from otel_gil import names
from otel_gil.views.blame import caused_by_hold, charges
from otel_gil.views.model import Recording, Slice, Stack, thread_labels

FLOW_MARGIN_NS = 1000  # how far inside both slices a flow's ends are put


def us(ns: int) -> float:
    """ns as microseconds, exact to the ns (a double holds these to 2^53 ns)."""
    return round(ns / 1000, 3)


def stack_labels(stack: Stack) -> List[str]:
    return [f.label() for f in stack]


def stack_frames(stack: Stack) -> List[Dict[str, Any]]:
    out = []
    for f in stack:
        frame: Dict[str, Any] = {"kind": f.kind, "function": f.function}
        for key in ("file", "object", "line"):
            if getattr(f, key) is not None:
                frame[key] = getattr(f, key)
        out.append(frame)
    return out


def _metadata(rec: Recording) -> List[Dict[str, Any]]:
    labels = thread_labels(rec.threads)
    events: List[Dict[str, Any]] = []
    for pid in sorted({t.pid for t in rec.threads.values()} | set(rec.processes)):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "ts": 0,
                       "args": {"name": rec.processes.get(pid, f"pid {pid}")}})
    for t in sorted(rec.threads.values(), key=lambda t: (t.pid, t.tid)):
        events.append({"name": "thread_name", "ph": "M", "pid": t.pid, "tid": t.tid, "ts": 0,
                       "args": {"name": labels[t.tid]}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": t.pid, "tid": t.tid,
                       "ts": 0, "args": {"sort_index": t.tid}})
    return events


def _args(rec: Recording, s: Slice, caused: Dict[Any, int]) -> Dict[str, Any]:
    args: Dict[str, Any] = {"start_ns": s.start_ns, "end_ns": s.end_ns}
    if s.kind in ("hold", "span"):
        args[names.VIEW_ARG_STACK.name] = stack_labels(s.stack)
        args[names.VIEW_ARG_FRAMES.name] = stack_frames(s.stack)
        args[names.VIEW_ARG_CAUSED.name] = caused.get(s.key, 0)
    if s.kind == "wait":
        args[names.VIEW_ARG_HOLDERS.name] = [
            {"tid": sh.tid, "thread": rec.thread_name(sh.tid), "held_ns": sh.held_ns}
            for sh in s.shares]
        charged = sorted(charges(s), key=lambda c: -c[2])
        if charged:  # the stack the wait is mostly charged to
            args[names.VIEW_ARG_STACK.name] = stack_labels(charged[0][0])
        args[names.VIEW_ARG_TRUNCATED.name] = s.truncated
    for key in ("trace_id", "span_id"):
        if getattr(s, key):
            args[key] = getattr(s, key)
    return args


def _slice_name(s: Slice) -> str:
    if s.kind == "wait":
        return names.GIL_WAIT.name
    if s.kind == "hold":
        return names.GIL_HOLD.name
    return s.name or "span"


def _flow(flow_id: int, hold: Slice, wait: Slice, rec: Recording) -> List[Dict[str, Any]]:
    """The two events of one arrow from hold to wait; none if they barely overlap."""
    start, end = max(hold.start_ns, wait.start_ns), min(hold.end_ns, wait.end_ns)
    margin = min(FLOW_MARGIN_NS, (end - start) // 4)
    if margin <= 0:
        return []
    common = {"name": names.VIEW_FLOW.name, "cat": names.VIEW_CATEGORY.name, "id": flow_id}
    return [
        dict(common, ph="s", pid=hold.pid, tid=hold.tid, ts=us(start + margin - rec.origin_ns)),
        dict(common, ph="f", bp="e", pid=wait.pid, tid=wait.tid,
             ts=us(end - margin - rec.origin_ns)),
    ]


def events(rec: Recording) -> List[Dict[str, Any]]:
    caused = caused_by_hold(rec)
    by_key = {s.key: s for s in rec.slices}
    out = _metadata(rec)
    for s in rec.slices:
        out.append({"name": _slice_name(s),
                    "cat": names.VIEW_CATEGORY.name if s.kind != "span" else "span",
                    "ph": "X", "pid": s.pid, "tid": s.tid,
                    "ts": us(s.start_ns - rec.origin_ns), "dur": us(s.duration_ns),
                    "args": _args(rec, s, caused)})
    flow_id = 0
    for wait in rec.waits:
        for share in wait.shares:
            hold: Optional[Slice] = by_key.get(share.source) if share.source else None
            if hold is not None:
                flow_id += 1
                out += _flow(flow_id, hold, wait, rec)
    return out


def timeline(rec: Recording) -> Dict[str, Any]:
    return {
        "traceEvents": events(rec),
        "displayTimeUnit": "ms",
        "otherData": {"title": rec.title, "clock": rec.clock, "origin_ns": rec.origin_ns,
                      "end_ns": rec.end_ns, "notes": list(rec.notes),
                      "producer": "otel-gil"},
    }


def timeline_text(rec: Recording) -> str:
    return json.dumps(timeline(rec), separators=(",", ":")) + "\n"
