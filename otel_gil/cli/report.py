"""What `otel-gil record` prints and writes: the per-thread table and the JSON
document described in docs/record-json.md. Pure functions of a finished Session."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from otel_gil import views
from otel_gil.abi import buckets, events
from otel_gil.probes.points import Point
from otel_gil.probes.session import Session
from otel_gil.probes.totals import ThreadTotals
from otel_gil.sidecar import timeline
from otel_gil.stacks import store as stacks
from otel_gil.target.disasm import Function
from otel_gil.target.process import Target

SCHEMA = "otel-gil/record/v1"
TOP_HOLDERS = 10
RELEASE_METHOD = {
    "call": "every direct call of pthread_cond_signal in the interpreter outside take_gil, "
            "kept when its argument is the GIL's condition variable: drop_gil signals it on "
            "every release in CPython 3.8-3.15, inlined or not, so releases are exact",
    "libc": "libc pthread_cond_signal filtered on the GIL's condition variable (no direct "
            "call site in this build): every release, exact",
    "none": "not probed by the contended set",
}
# Which probe set measures what, and how exactly (docs/record-json.md, "numbers").
NUMBERS = {
    "contended": {
        "waits": "exact: from a take_gil call's first timed wait on gil->cond to the wake-up "
                 "that found the GIL free (kernel timestamps)",
        "holders": "as the waiters saw them at each wake-up (gil->last_holder, switch_number): "
                   "a hand-off is placed at the first wake-up after it",
        "handoffs": "exact: CPython's gil->switch_number since attach, read from the process",
        "forced_switches": "exact: holds asked to drop (a timed wait expired, no switch)",
        "acquisitions": "only those that ended a wait",
        "holds": "only while another thread waited (not every hold: use --probes all)",
        "releases": "not seen",
    },
    "all": {
        "waits": "exact: from a take_gil call's first timed wait on gil->cond to the wake-up "
                 "that found the GIL free (kernel timestamps)",
        "holders": "exact: every hold that overlapped the wait",
        "handoffs": "exact: acquisitions by another thread than the last holder",
        "forced_switches": "exact: holds asked to drop (a timed wait expired, no switch)",
        "acquisitions": "exact: every acquisition",
        "holds": "exact: from take_gil done to the release that signals gil->cond",
        "releases": "exact",
    },
}


def _function(fn: Function) -> Dict[str, Any]:
    return {"name": fn.name, "address": fn.address, "size": fn.size,
            "ret_addresses": list(fn.ret_addresses), "source": fn.source}


def describe_probes(points: Sequence[Point]) -> List[Dict[str, Any]]:
    """Each uprobe: its role, the instruction under it, and how the kernel runs it."""
    return [{"role": p.role, "function": p.where, "address": p.address, "insn": p.insn,
             "handling": p.cost} for p in points]


def describe_target(target: Target, probe_set: str = "contended",
                    points: Sequence[Point] = ()) -> Dict[str, Any]:
    """Process info: the binary, version, flavour, symbols and how they were found,
    and where the probe set's probes sit."""
    interp = target.interpreter
    release = "none" if probe_set == "contended" else (
        "libc" if any(p.role == "release" and p.cost == "entry" for p in points) else "call")
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
        "release": {"method": RELEASE_METHOD[release],
                    "fidelity": "none" if release == "none" else "exact",
                    "probe": {"path": target.cond_signal[0], "address": target.cond_signal[1]}},
        "probes": {"set": probe_set, "sites": describe_probes(points)},
    }


def _histogram(hist: Sequence[int]) -> List[Dict[str, int]]:
    out = []
    for b, count in enumerate(hist):
        if count:
            low, high = buckets.bucket_bounds(b)
            out.append({"low_ns": low, "high_ns": high, "count": count})
    return out


def _thread(t: ThreadTotals, duration_ns: int) -> Dict[str, Any]:
    return {
        "pid": t.pid, "tid": t.tid, "ns_tid": t.ns_tid, "name": t.name,
        "acquisitions": t.acquisitions, "hold_ns": t.hold_ns, "wait_ns": t.wait_ns,
        "waits": t.waits, "timed_waits": t.timed_waits, "take_ns": t.take_ns,
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
                           "duration_ns": iv.duration_ns, "probe_set": iv.probe_set}
    if iv.kind == "hold":
        out["start_seen"] = iv.start_seen
    if iv.kind == "wait":
        out["holders"] = [{"tid": b.tid, "held_ns": b.held_ns} for b in timeline.blame(iv)]
        out["holders_truncated"] = timeline.holds_truncated(iv)
        out["holds"] = [_hold(h) for h in iv.holds]
    if iv.stacks:
        stacks.record_stacks(out, iv)  # holder stacks (otel_gil/stacks/store.py)
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
    probe_set = session.probe_set
    for pid, info in sorted(session.targets.items()):
        proc = describe_target(info.target, probe_set, session.probes.plans.get(pid, ()))
        st = info.state or events.TargetState()
        everything = probe_set == "all"
        proc.update(started_ns=info.started_ns, ended_ns=info.ended_ns,
                    attached_ns=info.attached_ns, gil_enabled_ns=info.gil_enabled_ns,
                    acquisitions=st.acq_seq if everything else sum(
                        t.acquisitions for t in threads if t.pid == pid),
                    handoffs=st.handoffs, forced_switches=st.forced_switches,
                    releases=st.releases if everything else None,
                    switch_number={"at_attach": info.switch_start, "last": info.switch_now},
                    torn_context_reads=st.torn_reads, gil_read_errors=st.read_errors,
                    lost_events=st.lost, untracked_threads=st.untracked)
        proc["holder_stacks"] = session.probes.stacks.counts(pid, st)  # otel_gil/stacks/store.py
        processes.append(proc)
    cfg = session.probes.config
    return {
        "schema": SCHEMA,
        "clock": "CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns)",
        "probe_set": probe_set,
        "numbers": NUMBERS[probe_set],
        "duration_ns": duration,
        "thresholds": {"wait_ns": cfg.wait_threshold_ns, "hold_ns": cfg.hold_threshold_ns},
        "processes": processes,
        "threads": [_thread(t, duration) for t in threads],
        "wait_histogram": _histogram(buckets.merge(t.wait_hist for t in threads
                                                    if t.wait_hist is not None)),
        "hold_histogram": _histogram(buckets.merge(t.hold_hist for t in threads
                                                    if t.hold_hist is not None)),
        "intervals": [_interval(iv) for iv in session.intervals],
        "intervals_dropped": session.intervals_dropped,
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
        path = _short_path(b.stack)
        lines.append(f"  {b.waited_ns / 1e9:9.4f} s  {100 * b.waited_ns / total:5.1f}%  "
                     f"{b.waits:>6} waits  {path}")
    if len(blamed) > rows:
        lines.append(f"  +{len(blamed) - rows} more holder stacks (see --flamegraph)")
    lines += [f"  note: {n}" for n in rec.notes]
    return "\n".join(lines)


def _short_path(stack: views.Stack, natives: int = 3) -> str:
    """A holder stack in one line, outermost first: its thread, its innermost
    Python frame and its innermost native frames (the C call), "…" where frames
    are left out (a captured stack is tens of frames; the flame graph has them all)."""
    inner = stack[:-1]  # innermost first; the thread is last
    keep = {i for i, f in enumerate(inner) if f.kind == "native"}
    keep = set(sorted(keep)[:natives])
    keep |= {next((i for i, f in enumerate(inner) if f.kind == "python"), len(inner))}
    keep |= {i for i, f in enumerate(inner) if f.kind in ("span", "missing")}
    parts = [stack[-1].label()]
    last = len(inner)
    for i in sorted((i for i in keep if i < len(inner)), reverse=True):
        if i != last - 1:
            parts.append("…")
        parts.append(inner[i].label())
        last = i
    return " > ".join(parts)


def table(doc: Dict[str, Any]) -> str:
    """The per-thread table printed by `otel-gil record` and refreshed by `top`.
    With the contended set, ACQUIRED counts only acquisitions that ended a wait
    and HOLD% only time held while another thread waited (marked with `*`)."""
    contended = doc.get("probe_set") == "contended"
    header = ("PID", "TID", "NAME", "ACQUIRED*" if contended else "ACQUIRED",
              "HOLD%*" if contended else "HOLD%", "WAIT%", "MAX WAIT ms", "P99 WAIT ms")
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
    handoffs = sum(p["handoffs"] for p in doc["processes"])
    forced = sum(p["forced_switches"] for p in doc["processes"])
    lines.append(f"probes: {doc.get('probe_set', 'all')}; hand-offs {handoffs}, forced "
                 f"switches {forced} (exact)" + (
                     "; * ACQUIRED: only those that ended a wait, HOLD%: only while another "
                     "thread waited (every hold: --probes all)" if contended else ""))
    return "\n".join(lines)
