"""What `otel-gil record` prints and writes: the per-thread table and the JSON
document described in docs/record-json.md. Pure functions of a finished Session."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from otel_gil import events, timeline, views
from otel_gil.disasm import Function
from otel_gil.discovery import Target
from otel_gil.session import Session, ThreadTotals

SCHEMA = "otel-gil/record/v1"
TOP_HOLDERS = 10
RELEASE_METHOD = (
    "libc pthread_cond_signal filtered on the GIL's condition variable: drop_gil signals "
    "it on every release in CPython 3.8-3.15, inlined or not, so releases are exact"
)


def _function(fn: Function) -> Dict[str, Any]:
    return {"name": fn.name, "address": fn.address, "size": fn.size,
            "ret_addresses": list(fn.ret_addresses), "source": fn.source}


def describe_target(target: Target) -> Dict[str, Any]:
    """Process info: the binary, version, flavour, symbols and how they were found."""
    interp = target.interpreter
    return {
        "pid": target.pid,
        "nspid": list(target.nspid),
        "binary": target.object_path,
        "build_id": interp.build_id,
        "version": ".".join(map(str, interp.version)),
        "free_threaded": interp.free_threaded,
        "static": interp.static,
        "symbols": {
            "source": interp.symbol_source,
            "take_gil": [_function(f) for f in interp.take_gil],
            "drop_gil": [_function(f) for f in interp.drop_gil],
        },
        "gil": {"address": target.gil.address, "cond_address": target.gil.cond_address,
                "interval_us": target.gil.interval_us, "enabled": target.gil.enabled,
                "enabled_count": target.gil.enabled_count, "found_by": target.gil.how},
        "unverified": interp.unverified,
        "release": {"method": RELEASE_METHOD, "fidelity": "exact",
                    "probe": {"path": target.cond_signal[0], "address": target.cond_signal[1]}},
    }


def _histogram(hist: Sequence[int]) -> List[Dict[str, int]]:
    out = []
    for b, count in enumerate(hist):
        if count:
            low, high = timeline.bucket_bounds(b)
            out.append({"low_ns": low, "high_ns": high, "count": count})
    return out


def _thread(t: ThreadTotals, duration_ns: int) -> Dict[str, Any]:
    return {
        "pid": t.pid, "tid": t.tid, "ns_tid": t.ns_tid, "name": t.name,
        "acquisitions": t.acquisitions, "hold_ns": t.hold_ns, "wait_ns": t.wait_ns,
        "max_wait_ns": t.max_wait_ns, "max_hold_ns": t.max_hold_ns,
        "p99_wait_ns": t.p99_wait_ns,
        "hold_pct": round(100.0 * t.hold_ns / duration_ns, 2) if duration_ns else 0.0,
        "wait_pct": round(100.0 * t.wait_ns / duration_ns, 2) if duration_ns else 0.0,
        "unmatched": t.unmatched,
    }


def _span_ids(span: Optional[events.SpanRef]) -> Dict[str, str]:
    if span is None:
        return {}
    return {"trace_id": f"{span.trace_id:032x}", "span_id": f"{span.span_id:016x}"}


def _hold(h: events.Hold) -> Dict[str, Any]:
    """A hold that overlapped a wait, with its window (the views draw it)."""
    out: Dict[str, Any] = {"tid": h.tid, "start_ns": h.start_ns, "end_ns": h.end_ns}
    out.update(_span_ids(h.span))
    return out


def _interval(iv: events.Interval) -> Dict[str, Any]:
    out: Dict[str, Any] = {"kind": iv.kind, "pid": iv.pid, "tid": iv.tid,
                           "start_ns": iv.start_ns, "end_ns": iv.end_ns,
                           "duration_ns": iv.duration_ns}
    if iv.kind == "wait":
        out["holders"] = [{"tid": b.tid, "held_ns": b.held_ns} for b in timeline.blame(iv)]
        out["holders_truncated"] = timeline.holds_truncated(iv)
        out["holds"] = [_hold(h) for h in iv.holds]
    out.update(_span_ids(iv.span))
    return out


def session_duration_ns(session: Session) -> int:
    """From the first attach to the last target's end (or now, while tracing)."""
    if not session.targets:
        return 0
    now = time.monotonic_ns()
    starts = [i.started_ns for i in session.targets.values()]
    ends = [i.ended_ns or now for i in session.targets.values()]
    return max(ends) - min(starts)


def to_json(session: Session) -> Dict[str, Any]:
    duration = session_duration_ns(session)
    threads = sorted(session.threads.values(), key=lambda t: (t.pid, t.tid))
    processes = []
    for _pid, info in sorted(session.targets.items()):
        proc = describe_target(info.target)
        st = info.state or events.Target()
        proc.update(started_ns=info.started_ns, ended_ns=info.ended_ns,
                    attached_ns=info.attached_ns, gil_enabled_ns=info.gil_enabled_ns,
                    acquisitions=st.acq_seq, handoffs=st.handoffs,
                    forced_switches=st.forced_switches, releases=st.releases,
                    lost_events=st.lost, untracked_threads=st.untracked)
        processes.append(proc)
    cfg = session.probes.config
    return {
        "schema": SCHEMA,
        "clock": "CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns)",
        "duration_ns": duration,
        "thresholds": {"wait_ns": cfg.wait_threshold_ns, "hold_ns": cfg.hold_threshold_ns},
        "processes": processes,
        "threads": [_thread(t, duration) for t in threads],
        "wait_histogram": _histogram(timeline.merge(t.wait_hist for t in threads)),
        "hold_histogram": _histogram(timeline.merge(t.hold_hist for t in threads)),
        "intervals": [_interval(iv) for iv in session.intervals],
        "lost_events": session.lost_events(),
        "skipped_probe_runs": session.skipped_runs,
    }


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}"


def holders_table(rec: views.Recording, rows: int = TOP_HOLDERS) -> str:
    """Holder stack -> GIL-seconds other threads spent waiting behind it
    (otel_gil/views/blame.py: each wait split over the holds that overlapped it),
    from the views' Recording of a record (views.from_record(to_json(session)))."""
    blamed = views.held_while_waited(rec)
    total = sum(b.waited_ns for b in blamed)
    lines = [f"Top holders while others waited ({_ms(total)} ms of waits over the threshold):"]
    if not blamed:
        lines.append("  (no wait over the threshold)")
    for b in blamed[:rows]:
        path = " > ".join(f.label() for f in reversed(b.stack))
        lines.append(f"  {b.waited_ns / 1e9:9.4f} s  {100 * b.waited_ns / total:5.1f}%  "
                     f"{b.waits:>6} waits  {path}")
    if len(blamed) > rows:
        lines.append(f"  +{len(blamed) - rows} more holder stacks (see --flamegraph)")
    lines += [f"  note: {n}" for n in rec.notes]
    return "\n".join(lines)


def table(doc: Dict[str, Any]) -> str:
    """The per-thread table printed by `otel-gil record` and refreshed by `top`."""
    header = ("PID", "TID", "NAME", "ACQUIRED", "HOLD%", "WAIT%", "MAX WAIT ms", "P99 WAIT ms")
    rows = [header]
    for t in sorted(doc["threads"], key=lambda t: -t["hold_ns"]):
        rows.append((str(t["pid"]), str(t["tid"]), t["name"][:16], str(t["acquisitions"]),
                     f"{t['hold_pct']:.1f}", f"{t['wait_pct']:.1f}",
                     _ms(t["max_wait_ns"]), _ms(t["p99_wait_ns"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    waits = sum(1 for iv in doc["intervals"] if iv["kind"] == "wait")
    lines.append(f"{len(doc['threads'])} threads over {doc['duration_ns'] / 1e9:.2f} s; "
                 f"{waits} waits >= {_ms(doc['thresholds']['wait_ns'])} ms; "
                 f"lost events: {doc['lost_events']}")
    return "\n".join(lines)
