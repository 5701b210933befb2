"""A Recording from a finished `otel-gil record` document (docs/record-json.md).

Each wait in the record carries the holds that overlapped it, with their
windows (``holds[]``: the probes' ring of the last releases, newest first, at
most 16). A hold that overlapped several waits appears in each of them with the
same timestamps, and a hold over the hold threshold is also an interval of its
own: the three are one hold slice here. A record written before hold windows
existed has only ``holders[]`` ({tid, held_ns}): the shares are taken from
there, and the timeline has no hold slices for them.

A wait that saw more hand-offs than its event carries (``holders_truncated``)
lacks its earliest holds. Other waits carried many of them, and long holds are
intervals of their own: the part of the wait before its earliest kept hold is
charged to those recorded holds of its process that overlap it. Only what none
of them covers stays ``[holders not recorded]``.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from otel_gil.views import model
from otel_gil.views.model import Recording, Share, Slice, Stack, Thread

HoldKey = Tuple[int, int]  # (tid, start_ns): one hold


def _int(raw: Any, key: str) -> int:
    value = raw.get(key) if isinstance(raw, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        where = (model.text(str(raw)) or "")[:80]
        raise ValueError(f"record: {key} is not an integer in {where}")
    return value


def _threads(doc: Dict[str, Any]) -> Dict[int, Thread]:
    out = {}
    for t in doc.get("threads") or []:
        name = t.get("name") if isinstance(t, dict) else None
        out[_int(t, "tid")] = Thread(_int(t, "pid"), _int(t, "tid"), model.text(name) or "?")
    return out


class _Builder:
    """Collects the hold slices of a record, one per hold, with their stacks."""

    def __init__(self, labels: Dict[int, str]) -> None:
        self.labels = labels
        self.holds: Dict[HoldKey, Slice] = {}
        self.captured: Dict[HoldKey, Stack] = {}
        self.thread_stacks: Dict[int, Stack] = {}  # one per thread: most holds have no capture

    def stack(self, key: HoldKey) -> Stack:
        """The hold's full stack: captured frames (if any), then its thread."""
        captured = self.captured.get(key)
        if captured:
            return model.holder_stack(captured, self.label(key[0]))
        stack = self.thread_stacks.get(key[0])
        if stack is None:
            stack = self.thread_stacks[key[0]] = model.holder_stack((), self.label(key[0]))
        return stack

    def label(self, tid: int) -> str:
        return self.labels.get(tid, f"tid {tid}")

    def note_stack(self, raw: Any) -> None:
        """A captured stack on a hold interval or a hold window (stack capture)."""
        stack = model.parse_stack(raw.get("stack")) if isinstance(raw, dict) else ()
        if stack:
            self.captured[(_int(raw, "tid"), _int(raw, "start_ns"))] = stack

    def hold(self, raw: Dict[str, Any], pid: int) -> Slice:
        """The hold slice of this hold, made on first sight."""
        key = (_int(raw, "tid"), _int(raw, "start_ns"))
        hold = self.holds.get(key)
        if hold is None:
            hold = self.holds[key] = Slice(
                "hold", pid, key[0], key[1], _int(raw, "end_ns"),
                stack=self.stack(key),
                trace_id=model.text(raw.get("trace_id")), span_id=model.text(raw.get("span_id")))
        return hold

    def wait(self, raw: Dict[str, Any]) -> Slice:
        pid, tid = _int(raw, "pid"), _int(raw, "tid")
        start, end = _int(raw, "start_ns"), _int(raw, "end_ns")
        shares: List[Share] = []
        if isinstance(raw.get("holds"), list):
            for h in raw["holds"]:
                overlap = min(_int(h, "end_ns"), end) - max(_int(h, "start_ns"), start)
                if overlap > 0 and _int(h, "tid") != tid:
                    hold = self.hold(h, pid)
                    shares.append(Share(hold.tid, overlap, hold.stack, hold.key))
        else:  # a record from before hold windows: per-thread totals only
            for h in raw.get("holders") or []:
                shares.append(Share(_int(h, "tid"), _int(h, "held_ns"),
                                    self.stack((h["tid"], -1))))
        return Slice("wait", pid, tid, start, end, shares=tuple(shares),
                     truncated=raw.get("holders_truncated") is True,
                     trace_id=model.text(raw.get("trace_id")),
                     span_id=model.text(raw.get("span_id")))


def fill_truncated(waits: List[Slice], holds: List[Slice]) -> List[Slice]:
    """The waits, each truncated one with shares added from the recorded holds
    of its process (other threads') that overlap it before its earliest kept
    hold. The GIL has one holder at a time, so a process's holds do not overlap
    and none is charged twice."""
    by_pid: Dict[int, List[Slice]] = {}
    for h in sorted(holds, key=lambda h: h.start_ns):
        by_pid.setdefault(h.pid, []).append(h)
    starts = {pid: [h.start_ns for h in hs] for pid, hs in by_pid.items()}
    out = []
    for w in waits:
        if not w.truncated or w.pid not in by_pid:
            out.append(w)
            continue
        known = {s.source for s in w.shares if s.source is not None}
        if len(known) < len(w.shares):
            out.append(w)  # a record without hold windows: nothing to match
            continue
        before = min([key[2] for key in known] + [w.end_ns])
        pid_holds, added = by_pid[w.pid], []
        i = bisect.bisect_left(starts[w.pid], before) - 1
        while i >= 0 and pid_holds[i].end_ns > w.start_ns:
            h = pid_holds[i]
            overlap = min(h.end_ns, before) - max(h.start_ns, w.start_ns)
            if h.tid != w.tid and h.key not in known and overlap > 0:
                added.append(Share(h.tid, overlap, h.stack, h.key))
            i -= 1
        out.append(dataclasses.replace(w, shares=w.shares + tuple(reversed(added)))
                   if added else w)
    return out


def notes(doc: Dict[str, Any], waits: List[Slice]) -> List[str]:
    """What the record lacks, in words: every view shows these."""
    out = []
    lost = doc.get("lost_events")
    if isinstance(lost, int) and lost:
        out.append(f"{lost} events were lost (see lost_events): waits and holds are missing")
    dropped = doc.get("intervals_dropped")
    if isinstance(dropped, int) and dropped:
        out.append(f"the record was truncated: {dropped} waits and holds over the thresholds "
                   "were not kept (intervals_dropped)")
    truncated = sum(1 for w in waits if w.truncated)
    if truncated:
        out.append(f"{truncated} of {len(waits)} waits saw more hand-offs than the record keeps "
                   "(16): their earliest holders are taken, where the record has them, from "
                   "the holds other waits and long holds recorded; what those miss is "
                   "[holders not recorded]")
    return out


def from_record(doc: Dict[str, Any], title: Optional[str] = None) -> Recording:
    """The Recording of a record document; ValueError if it is not one."""
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("otel-gil/record/"):
        raise ValueError("not an otel-gil record (no otel-gil/record/ schema)")
    threads = _threads(doc)
    builder = _Builder(model.thread_labels(threads))
    intervals = [iv for iv in doc.get("intervals") or [] if isinstance(iv, dict)]
    for iv in intervals:
        if iv.get("kind") == "hold":
            builder.note_stack(iv)
        holds = iv.get("holds")
        for h in holds if isinstance(holds, list) else []:
            builder.note_stack(h)
    waits = []
    for iv in intervals:
        if iv.get("kind") == "hold":
            builder.hold(iv, _int(iv, "pid"))
        elif iv.get("kind") == "wait":
            waits.append(builder.wait(iv))
    waits = fill_truncated(waits, list(builder.holds.values()))
    slices = sorted(list(builder.holds.values()) + waits, key=lambda s: (s.start_ns, s.kind))
    starts = [p["started_ns"] for p in doc.get("processes") or []
              if isinstance(p.get("started_ns"), int)]
    origin = min(starts + [s.start_ns for s in slices[:1]] or [0])
    duration = doc.get("duration_ns") if isinstance(doc.get("duration_ns"), int) else 0
    end = max([origin + duration] + [s.end_ns for s in slices])
    processes = _processes(doc)
    pids = sorted(set(processes) | {t.pid for t in threads.values()})
    return Recording(title or "GIL record of pid " + ", ".join(map(str, pids)),
                     "CLOCK_MONOTONIC ns", origin, end, threads=threads, processes=processes,
                     slices=slices, notes=notes(doc, waits))


def _processes(doc: Dict[str, Any]) -> Dict[int, str]:
    """pid -> "python3.11 (CPython 3.11.2), pid N", as the timeline names it."""
    out = {}
    for p in doc.get("processes") or []:
        if isinstance(p, dict) and isinstance(p.get("pid"), int):
            binary = model.text(p.get("binary")) or "?"
            version = model.text(p.get("version")) or "?"
            out[p["pid"]] = f"{binary.rsplit('/', 1)[-1]} (CPython {version}), pid {p['pid']}"
    return out
