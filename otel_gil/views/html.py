"""One self-contained HTML page: the timeline (drawn by page.js from data
embedded in the page), the flame graph (the SVG of svg.py, inline) and the
top-holders table. No network: the page's Content-Security-Policy forbids
every fetch, and everything it shows is inside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List
from xml.sax.saxutils import escape

from otel_gil.views import svg
from otel_gil.views.blame import caused_by_hold, charges, held_while_waited
from otel_gil.views.model import Recording, Slice, thread_labels

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data:")
KIND_CODE = {"hold": 0, "wait": 1, "span": 2}
TOP_HOLDERS = 15


def _ms(ns: int) -> str:
    return f"{ns / 1e6:,.3f} ms"


def _tip(rec: Recording, s: Slice, caused: Dict[Any, int]) -> str:
    """The hover text of a slice (set as textContent by page.js, never as HTML)."""
    head = {"hold": "GIL hold", "wait": "GIL wait", "span": f"span {s.name}"}[s.kind]
    lines = [f"{head} on {rec.thread_name(s.tid)} (tid {s.tid}): {_ms(s.duration_ns)}",
             f"from {_ms(s.start_ns - rec.origin_ns)} to {_ms(s.end_ns - rec.origin_ns)}"]
    if s.kind in ("hold", "span"):
        lines.append(f"others waited behind it: {_ms(caused.get(s.key, 0))}")
        lines += ["stack (innermost first):"] + [f"  {f.label()}" for f in s.stack]
    if s.kind == "wait":
        lines.append("charged to:")
        for stack, _, ns in sorted(charges(s), key=lambda c: -c[2]):
            lines.append(f"  {_ms(ns)}  " + " < ".join(f.label() for f in stack))
        if s.truncated:
            lines.append("  (more hand-offs than the event keeps: its earliest holders are the "
                         "holds the record has from elsewhere)")
    if s.trace_id:
        lines.append(f"trace {s.trace_id} span {s.span_id}")
    return "\n".join(lines)


def data(rec: Recording) -> Dict[str, Any]:
    """What page.js draws: threads, slices [kind, thread, start, end] in ns from
    the origin, the hover texts, and flows [hold slice, wait slice, t0, t1]."""
    labels = thread_labels(rec.threads)
    order = sorted(rec.threads.values(), key=lambda t: (t.pid, t.tid))
    lane = {t.tid: i for i, t in enumerate(order)}
    threads = [{"tid": t.tid, "pid": t.pid, "name": labels[t.tid]} for t in order]
    for s in rec.slices:  # a thread the record has no totals for
        if s.tid not in lane:
            lane[s.tid] = len(threads)
            threads.append({"tid": s.tid, "pid": s.pid, "name": f"tid {s.tid}"})
    caused = caused_by_hold(rec)
    index = {s.key: i for i, s in enumerate(rec.slices)}
    slices, tips, flows = [], [], []
    for s in rec.slices:
        slices.append([KIND_CODE[s.kind], lane[s.tid], s.start_ns - rec.origin_ns,
                       s.end_ns - rec.origin_ns])
        tips.append(_tip(rec, s, caused))
    for w, s in enumerate(rec.slices):
        for share in s.shares:
            h = index.get(share.source) if share.source else None
            if h is not None:
                hold = rec.slices[h]
                t0, t1 = max(hold.start_ns, s.start_ns), min(hold.end_ns, s.end_ns)
                flows.append([h, w, t0 - rec.origin_ns, t1 - rec.origin_ns])
    return {"title": rec.title, "clock": rec.clock, "duration_ns": rec.end_ns - rec.origin_ns,
            "threads": threads, "slices": slices, "tips": tips, "flows": flows}


def _json_for_script(value: Any) -> str:
    """JSON that cannot end the <script> element it sits in, whatever the
    thread names and frames in it say (they come from the traced process)."""
    text = json.dumps(value, separators=(",", ":"))
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                       ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return text


def _top_table(rec: Recording) -> str:
    blamed = held_while_waited(rec)
    total = sum(b.waited_ns for b in blamed)
    if not blamed:
        return "<p>No wait over the threshold was recorded.</p>"
    rows = ["<table class=\"top\"><thead><tr><th>others waited</th><th>share</th>"
            "<th>waits</th><th>holder stack (outermost first)</th></tr></thead><tbody>"]
    for b in blamed[:TOP_HOLDERS]:
        path = " &gt; ".join(escape(f.label()) for f in reversed(b.stack))
        rows.append(f"<tr><td>{_ms(b.waited_ns)}</td><td>{100 * b.waited_ns / total:.1f}%</td>"
                    f"<td>{b.waits}</td><td>{path}</td></tr>")
    if len(blamed) > TOP_HOLDERS:
        rows.append(f"<tr><td colspan=\"4\">+{len(blamed) - TOP_HOLDERS} more stacks "
                    "(in the flame graph)</td></tr>")
    return "".join(rows) + "</tbody></table>"


def page(rec: Recording) -> str:
    notes: List[str] = [f"<li>{escape(n)}</li>" for n in rec.notes]
    waited = sum(s.duration_ns for s in rec.waits)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<link rel="icon" href="data:,">',
        f"<title>{escape(rec.title)}</title>",
        f"<style>{(HERE / 'page.css').read_text()}</style></head><body>",
        f"<h1>{escape(rec.title)}</h1>",
        f'<p class="summary">{len(rec.threads)} threads, {len(rec.waits)} waits over the '
        f"threshold ({_ms(waited)} waited), over {_ms(rec.end_ns - rec.origin_ns)}; "
        f"times in {escape(rec.clock)}.</p>",
        f'<ul class="notes">{"".join(notes)}</ul>' if notes else "",
        '<h2>Timeline</h2><p class="help">One track per thread: '
        '<span class="key hold">hold</span> <span class="key wait">wait</span>'
        + (' <span class="key span">span a holder was in</span>'
           if any(s.kind == "span" for s in rec.slices) else "")
        + "; arrows from each holder to the waits it caused. "
        "Wheel: zoom; drag: pan; double-click: all.</p>",
        '<div id="timeline-box"><svg id="timeline" class="timeline"></svg>'
        '<div id="tip" hidden></div></div><p id="status"></p>',
        "<h2>Held while others waited</h2>",
        '<div class="flame-box">' + svg.element(rec) + "</div>",
        "<h2>Top holders while others waited</h2>", _top_table(rec),
        f'<script type="application/json" id="data">{_json_for_script(data(rec))}</script>',
        f"<script>{(HERE / 'page.js').read_text()}</script>",
        "</body></html>", ""])
