"""What `otel-gil record` prints and writes: the per-thread table and the JSON
document described in docs/record-json.md. Pure functions of a finished Session."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

from otel_gil import events, timeline
from otel_gil.disasm import Function
from otel_gil.discovery import Target
from otel_gil.session import Session, ThreadTotals

SCHEMA = "otel-gil/record/v1"
RELEASE_METHOD = (
    "libc pthread_cond_signal filtered on the GIL's condition variable: drop_gil signals "
    "it on every release in CPython 3.8-3.14, inlined or not, so releases are exact"
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
                "found_by": target.gil.how},
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


def _interval(iv: events.Interval) -> Dict[str, Any]:
    out: Dict[str, Any] = {"kind": iv.kind, "pid": iv.pid, "tid": iv.tid,
                           "start_ns": iv.start_ns, "end_ns": iv.end_ns,
                           "duration_ns": iv.duration_ns}
    if iv.kind == "wait":
        out["holders"] = [{"tid": b.tid, "held_ns": b.held_ns} for b in timeline.blame(iv)]
        out["holders_truncated"] = timeline.holds_truncated(iv)
    if iv.span is not None:
        out["trace_id"] = f"{iv.span.trace_id:032x}"
        out["span_id"] = f"{iv.span.span_id:016x}"
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
        "wait_histogram": _histogram(timeline.merge(t.wait_hist for t in threads
                                                    if t.wait_hist is not None)),
        "hold_histogram": _histogram(timeline.merge(t.hold_hist for t in threads
                                                    if t.hold_hist is not None)),
        "intervals": [_interval(iv) for iv in session.intervals],
        "intervals_dropped": session.intervals_dropped,
        "lost_events": session.lost_events(),
        "skipped_probe_runs": session.skipped_runs,
    }


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}"


def table(doc: Dict[str, Any]) -> str:
    """The per-thread table printed at the end of `otel-gil record`."""
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
    beyond = doc.get("intervals_dropped", 0)
    kept = f" (and {beyond} more not kept: --max-intervals)" if beyond else ""
    lines.append(f"{len(doc['threads'])} threads over {doc['duration_ns'] / 1e9:.2f} s; "
                 f"{waits} waits >= {_ms(doc['thresholds']['wait_ns'])} ms{kept}; "
                 f"lost events: {doc['lost_events']}")
    return "\n".join(lines)
