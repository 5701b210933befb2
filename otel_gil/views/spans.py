"""A Recording from exported spans (what `otel-gil demo` collects): the
`gil.wait` and `gil.hold` spans, and the app's spans their holder links name.

Spans carry less than a record: a wait says how long each holder thread held
the GIL within it and, through its links, which span the holder was in, but
not the windows of the holds. So each wait is charged to "span X on thread T"
where the link says so (the holder's span name tops its stack), the rest of a
holder's share to its thread alone; the timeline shows the holder's span on
its track and draws the arrow from that span, not from a hold. Holds over the
hold threshold are spans of their own and are drawn as holds. Only waits under
sampled spans are exported, so only those are here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from otel_gil import names
from otel_gil.trust import printable
from otel_gil.views import model
from otel_gil.views.model import Recording, Share, Slice, Thread

NOTE = ("built from the spans received: hold windows are not in spans, so arrows start at "
        "the span each holder was in; only waits in sampled spans are shown")


def _int(attrs: Dict[str, Any], key: str, default: int = 0) -> int:
    value = attrs.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _ints(attrs: Dict[str, Any], key: str) -> List[int]:
    value = attrs.get(key)
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


class _Spans:
    def __init__(self, spans: Sequence[Any]) -> None:
        self.by_id = {s.span_id: s for s in spans}
        self.gil = [s for s in spans if s.name in (names.GIL_WAIT.name, names.GIL_HOLD.name)]
        self.names: Dict[int, str] = {}
        self.pids: Dict[int, int] = {}
        self.span_thread: Dict[str, int] = {}  # an app span -> the host tid it ran on
        for s in self.gil:
            tid = _int(s.attributes, names.THREAD_HOST_ID.name, -1)
            if tid < 0:
                continue
            name = s.attributes.get(names.THREAD_NAME.name)
            self.names[tid] = printable(name) if isinstance(name, str) else f"tid {tid}"
            self.pids[tid] = _int(s.attributes, names.PROCESS_HOST_PID.name)
            self.span_thread[s.parent_span_id] = tid
            holder_names = s.attributes.get(names.HOLDER_NAMES.name) or []
            for htid, hname in zip(_ints(s.attributes, names.HOLDER_TIDS.name), holder_names):
                if isinstance(hname, str):
                    self.names.setdefault(htid, printable(hname))
                    self.pids.setdefault(htid, self.pids[tid])

    def threads(self) -> Dict[int, Thread]:
        return {tid: Thread(self.pids.get(tid, 0), tid, n) for tid, n in self.names.items()}


def _shares(sp: _Spans, wait: Any, labels: Dict[int, str],
            holder_spans: Dict[str, Slice]) -> Tuple[Share, ...]:
    """Linked holder spans first (thread topped by the span's name), then what is
    left of each holder thread's time, charged to the thread alone."""
    attrs = wait.attributes
    left = dict(zip(_ints(attrs, names.HOLDER_TIDS.name), _ints(attrs, names.HOLDER_HELD_NS.name)))
    shares = []
    for _, span_id, link_attrs in wait.links:
        held = _int(link_attrs, names.LINK_HELD_NS.name)
        tid, span = sp.span_thread.get(span_id), sp.by_id.get(span_id)
        if link_attrs.get(names.LINK_ROLE.name) != "holder" or tid is None or span is None:
            continue  # a holder span whose thread we cannot tell: stays in its thread's share
        held = min(held, left.get(tid, 0))
        if held <= 0:
            continue
        left[tid] -= held
        stack = model.holder_stack((), labels.get(tid, f"tid {tid}"), printable(span.name))
        hs = holder_spans.setdefault(span_id, Slice(
            "span", sp.pids.get(tid, 0), tid, span.start_ns, span.end_ns, name=printable(span.name),
            stack=stack, trace_id=span.trace_id, span_id=span.span_id))
        shares.append(Share(tid, held, stack, hs.key))
    for tid, held in left.items():
        if held > 0:
            shares.append(Share(tid, held, model.holder_stack((), labels.get(tid, f"tid {tid}"))))
    return tuple(shares)


def _parent_name(sp: _Spans, span: Any) -> Optional[str]:
    parent = sp.by_id.get(span.parent_span_id)
    return printable(parent.name) if parent is not None else None


def from_spans(spans: Sequence[Any], title: str = "GIL waits in the spans received") \
        -> Recording:
    """The Recording of received spans (otel_gil.receiver.SpanRecord or alike)."""
    sp = _Spans(spans)
    threads = sp.threads()
    labels = model.thread_labels(threads)
    holder_spans: Dict[str, Slice] = {}
    slices: List[Slice] = []
    for s in sp.gil:
        tid = _int(s.attributes, names.THREAD_HOST_ID.name, -1)
        if tid < 0:
            continue
        pid = sp.pids.get(tid, 0)
        if s.name == names.GIL_WAIT.name:
            slices.append(Slice("wait", pid, tid, s.start_ns, s.end_ns,
                                shares=_shares(sp, s, labels, holder_spans),
                                truncated=s.attributes.get(names.HOLDERS_TRUNCATED.name) is True,
                                trace_id=s.trace_id, span_id=s.parent_span_id))
        else:
            stack = model.holder_stack((), labels.get(tid, f"tid {tid}"), _parent_name(sp, s))
            slices.append(Slice("hold", pid, tid, s.start_ns, s.end_ns, stack=stack,
                                trace_id=s.trace_id, span_id=s.parent_span_id))
    slices = sorted(slices + list(holder_spans.values()), key=lambda s: (s.start_ns, s.kind))
    origin = min((s.start_ns for s in slices), default=0)
    end = max((s.end_ns for s in slices), default=origin)
    waits = [s for s in slices if s.kind == "wait"]
    notes = [NOTE]
    truncated = sum(1 for w in waits if w.truncated)
    if truncated:
        notes.append(f"{truncated} of {len(waits)} waits saw more hand-offs than a span "
                     "records: their earliest holders are not known")
    return Recording(title, "wall clock ns (span times)", origin, end, threads=threads,
                     slices=slices, notes=notes)
