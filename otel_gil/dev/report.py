"""The result of `otel-gil demo`: summarize() turns the spans and metric points
the embedded receiver collected (otel_gil/dev/receiver.py) into the JSON document
(out/demo.json), and render() turns that into the text shown on the terminal.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from otel_gil import names
from otel_gil.dev.load import LoadStats

__all__ = ["SERVER", "render", "summarize", "summarize_metrics"]

SERVER = 2  # opentelemetry-proto trace.v1 Span.SpanKind.SPAN_KIND_SERVER


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def _wait_ns(span: Any) -> int:
    return int(span.attributes.get(names.WAIT_NS.name, span.end_ns - span.start_ns))


def _request_of(span: Any, by_id: Dict[str, Any]) -> Optional[Any]:
    """The nearest SERVER ancestor: the request the wait happened in."""
    parent = by_id.get(span.parent_span_id)
    for _ in range(64):  # a bound, against a malformed parent cycle
        if parent is None or parent.kind == SERVER:
            return parent
        parent = by_id.get(parent.parent_span_id)
    return None


def _request(req: Any, waits: Sequence[Any], by_id: Dict[str, Any],
             threads: Dict[str, str]) -> Dict[str, Any]:
    """One request with its GIL waits, the threads that held the GIL meanwhile
    and the spans (traces) they were in, each with how long it held."""
    holders: Dict[str, int] = {}
    linked: Dict[Tuple[str, str], int] = {}
    for w in waits:
        for name, held in zip(w.attributes.get(names.HOLDER_NAMES.name, []),
                              w.attributes.get(names.HOLDER_HELD_NS.name, [])):
            holders[name] = holders.get(name, 0) + held
        for trace_id, span_id, attrs in w.links:
            if attrs.get(names.LINK_ROLE.name) == "holder":
                key = (trace_id, span_id)
                linked[key] = linked.get(key, 0) + attrs.get(names.LINK_HELD_NS.name, 0)
    return {
        "name": req.name, "trace_id": req.trace_id, "span_id": req.span_id,
        "duration_ms": _ms(req.end_ns - req.start_ns),
        "gil_wait_ms": _ms(sum(_wait_ns(w) for w in waits)), "gil_waits": len(waits),
        "thread": waits[0].attributes.get(names.THREAD_NAME.name) if waits else None,
        "holders": [{"thread": n, "held_ms": _ms(ns)}
                    for n, ns in sorted(holders.items(), key=lambda kv: -kv[1])],
        "holder_spans": [{"trace_id": t, "span_id": s, "held_ms": _ms(ns),
                          "name": by_id[s].name if s in by_id else None,
                          "thread": threads.get(s)}
                         for (t, s), ns in sorted(linked.items(), key=lambda kv: -kv[1])],
        "holder_stack": holder_top(waits),  # top Python line, native function
    }


def _endpoints(requests: Sequence[Any], wait_ns: Dict[str, int]) -> List[Dict[str, Any]]:
    out = []
    for name in sorted({r.name for r in requests}):
        durations = [r.end_ns - r.start_ns for r in requests if r.name == name]
        waited = [wait_ns.get(r.span_id, 0) for r in requests if r.name == name]
        out.append({"name": name, "count": len(durations),
                    "mean_ms": _ms(sum(durations) / len(durations)), "max_ms": _ms(max(durations)),
                    "mean_gil_wait_ms": _ms(sum(waited) / len(waited))})
    return out


def summarize(spans: Sequence[Any], metrics: Sequence[Any], stats: LoadStats,
              slowest: int = 10) -> Dict[str, Any]:
    """The demo's result (out/demo.json) from the received spans and metric points."""
    by_id = {s.span_id: s for s in spans}
    requests = [s for s in spans if s.kind == SERVER]
    waits: Dict[str, List[Any]] = {}
    for span in spans:
        req = _request_of(span, by_id) if span.name == names.GIL_WAIT.name else None
        if req is not None:
            waits.setdefault(req.span_id, []).append(span)
    wait_ns = {sid: sum(_wait_ns(w) for w in ws) for sid, ws in waits.items()}
    # A span's thread, where a GIL span of that thread names it: that is how a
    # holder thread is matched with the span (trace) it was in.
    threads = {g.parent_span_id: g.attributes[names.THREAD_NAME.name] for g in spans
               if g.name in (names.GIL_WAIT.name, names.GIL_HOLD.name)}
    total_ns = sum(r.end_ns - r.start_ns for r in requests)
    top = sorted(requests, key=lambda r: r.start_ns - r.end_ns)[:slowest]
    return {
        "service": requests[0].resource.get("service.name") if requests else None,
        "load": stats.to_json(),
        "requests": {"total": len(requests), "with_gil_wait": len(waits),
                     "time_ms": _ms(total_ns), "gil_wait_ms": _ms(sum(wait_ns.values())),
                     "gil_wait_share": round(sum(wait_ns.values()) / total_ns, 4)
                     if total_ns else 0.0},
        "gil_spans": {"wait": sum(s.name == names.GIL_WAIT.name for s in spans),
                      "hold": sum(s.name == names.GIL_HOLD.name for s in spans)},
        "endpoints": _endpoints(requests, wait_ns),
        "slowest": [_request(r, waits.get(r.span_id, []), by_id, threads) for r in top],
        "metrics": summarize_metrics(metrics),
    }


def summarize_metrics(points: Sequence[Any]) -> List[Dict[str, Any]]:
    """Per otel-gil metric that arrived: the latest point of each series, added
    up over the series (threads). Sums are cumulative (the OTLP exporter's default
    temporality), so the latest point is the total."""
    latest: Dict[Tuple[str, str], Any] = {}
    for p in points:
        key = (p.name, json.dumps([p.attributes, p.resource], sort_keys=True, default=str))
        if key not in latest or p.time_ns >= latest[key].time_ns:
            latest[key] = p
    out = []
    for metric in names.METRICS:
        series = [p for (name, _), p in latest.items() if name == metric.name]
        if not series:
            continue
        entry: Dict[str, Any] = {"name": metric.name, "unit": metric.unit,
                                 "instrument": metric.instrument, "series": len(series)}
        if series[0].kind == "histogram":
            entry.update(count=sum(p.value["count"] for p in series),
                         sum=sum(p.value["sum"] for p in series),
                         max=max(p.value["max"] for p in series))
        elif metric.instrument == "gauge":  # a ratio per process: the highest
            entry["value"] = max(p.value for p in series)
        else:
            entry["value"] = sum(p.value for p in series)
        out.append(entry)
    return out


# ------------------------------------------------------------------- the terminal


def _metric_line(m: Dict[str, Any]) -> str:
    if "count" in m:  # a duration histogram, in seconds
        mean = m["sum"] / m["count"] if m["count"] else 0.0
        value = f"{m['count']} recorded, mean {mean * 1e3:.2f} ms, max {m['max'] * 1e3:.2f} ms"
    elif m["unit"] == "s":
        value = f"{m['value']:.3f} s"
    elif m["unit"] == "1":
        value = f"{m['value']:.3f}"
    else:
        value = f"{m['value']:.0f}"
    return f"  {m['name']:<28} {value}"


def _held(ms: float) -> str:
    """A holder's share, readable at any size: a share under 0.1 ms in µs,
    rather than a "0.0 ms" that reads as none."""
    return f"{ms:5.1f} ms" if ms >= 0.1 else f"{ms * 1000:5.1f} µs"


def _slow_lines(i: int, r: Dict[str, Any], holders: int = 3) -> List[str]:
    lines = [f"{i:>3}. {r['name']:<12} {r['duration_ms']:6.1f} ms, of which {r['gil_wait_ms']:.1f} "
             f"ms waiting for the GIL ({r['gil_waits']} waits)   trace {r['trace_id']}"]
    for h in r["holders"][:holders]:
        spans = [s for s in r["holder_spans"] if s["thread"] == h["thread"]]
        where = f"   in {spans[0]['name']} trace {spans[0]['trace_id']}" if spans else ""
        more = f" (+{len(spans) - 1} more)" if len(spans) > 1 else ""
        lines.append(f"       {h['thread']:<34} held it {_held(h['held_ms'])}{where}{more}")
    top = r.get("holder_stack")
    if top:
        where = " in ".join(x for x in (top.get("python"), top.get("native")) if x)
        lines.append(f"       the holder was at {where}")
    rest = r["holders"][holders:]
    if rest:
        lines.append(f"       +{len(rest)} more holder{'s' if len(rest) > 1 else ''}, "
                     f"{sum(h['held_ms'] for h in rest):.1f} ms")
    return lines


def render(result: Dict[str, Any]) -> str:
    req, load_ = result["requests"], result["load"]
    out = [f"\nGIL contention in {result['service'] or 'the demo app'}: "
           f"{load_['seconds']:.1f} s of load, {load_['sent']} requests sent, "
           f"{load_['errors']} errors",
           f"  {req['total']} request spans received; {req['with_gil_wait']} of them waited "
           f"for the GIL (waits over the 1 ms threshold)",
           f"  {req['gil_wait_share']:.1%} of request time was spent waiting for the GIL "
           f"({req['gil_wait_ms'] / 1e3:.2f} s of {req['time_ms'] / 1e3:.2f} s)", "",
           f"  {'endpoint':<12} {'requests':>8} {'mean':>10} {'max':>10} {'mean GIL wait':>14}"]
    out += [f"  {e['name']:<12} {e['count']:>8} {e['mean_ms']:>7.1f} ms {e['max_ms']:>7.1f} ms "
            f"{e['mean_gil_wait_ms']:>11.1f} ms" for e in result["endpoints"]]
    out += ["", f"Slowest {len(result['slowest'])} requests; who held the GIL while each "
                "waited, and in which trace:"]
    for i, r in enumerate(result["slowest"], 1):
        out += _slow_lines(i, r)
    out += ["", "Sidecar metrics (OTLP):" if result["metrics"] else "no metrics received"]
    out += [_metric_line(m) for m in result["metrics"]]
    return "\n".join(out)


def holder_top(waits: Sequence[Any]) -> Optional[Dict[str, str]]:
    """From exported gil.wait spans (receiver records with .attributes): the
    holder's top Python line and native function of the longest one that
    carries a stack (the demo's slowest requests show these)."""
    best: Optional[Dict[str, str]] = None
    longest = -1
    for w in waits:
        a = w.attributes
        funcs = a.get(names.STACK_PY_FUNCTIONS.name) or []
        native = [n for n in a.get(names.STACK_NATIVE_FUNCTIONS.name) or [] if n != "?"]
        if not (funcs or native) or a.get(names.WAIT_NS.name, 0) <= longest:
            continue
        longest = a.get(names.WAIT_NS.name, 0)
        top: Dict[str, str] = {}
        if funcs:
            files = a.get(names.STACK_PY_FILES.name) or ["?"]
            lines = a.get(names.STACK_PY_LINES.name) or [0]
            top["python"] = f"{funcs[0]} ({files[0]}:{lines[0]})"
        if native:
            top["native"] = native[0]
        best = top
    return best
