"""Every name otel-gil emits: span names, attributes, metrics and their units.

This module is the single source of truth. ``docs/names.md`` is generated from
it (``python -m otel_gil.names > docs/names.md``) and a test checks the two
agree. Nothing else in the package spells an emitted name as a string literal.

There is no OpenTelemetry semantic convention for GIL or lock contention, so
everything GIL-specific lives under the ``otel_gil.`` prefix. Thread and process
attributes reuse the semantic conventions where they exist (``thread.id`` is the
*managed* Python thread ident, ``process.pid`` the pid in the app's own PID
namespace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# --------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class SpanName:
    name: str
    doc: str


GIL_WAIT = SpanName(
    "gil.wait",
    "A wait for the GIL longer than the wait threshold. Child of the span active on "
    "the waiting thread when the wait began; start and end are the kernel timestamps "
    "of take_gil entry and return, on the app's wall clock. Links point to the spans "
    "the holders were in.",
)
GIL_HOLD = SpanName(
    "gil.hold",
    "A hold of the GIL longer than the hold threshold. Child of the span that was active "
    "on the holding thread for the whole hold; a hold that began under another span is "
    "not exported (no single span contains it) but stays in the metrics.",
)
SPANS: Tuple[SpanName, ...] = (GIL_WAIT, GIL_HOLD)

# ---------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str
    doc: str


# Semantic-convention attributes we set.
THREAD_ID = Attribute(
    "thread.id", "int", "Python thread ident (threading.get_ident()), where known.")
THREAD_NAME = Attribute("thread.name", "string", "Python thread name, or the OS thread name.")
PROCESS_PID = Attribute(
    "process.pid", "int", "Process id as the app sees it (its own PID namespace).")

# otel-gil's own.
THREAD_NATIVE_ID = Attribute(
    "otel_gil.thread.native_id", "int",
    "OS thread id in the app's PID namespace (threading.get_native_id()).")
THREAD_HOST_ID = Attribute(
    "otel_gil.thread.host_id", "int", "OS thread id in the host (sidecar's) PID namespace.")
PROCESS_HOST_PID = Attribute(
    "otel_gil.process.host_pid", "int", "Process id in the host (sidecar's) PID namespace.")
WAIT_NS = Attribute("otel_gil.wait_ns", "int", "Duration of the wait, nanoseconds.")
HOLD_NS = Attribute("otel_gil.hold_ns", "int", "Duration of the hold, nanoseconds.")
HOLDER_TIDS = Attribute(
    "otel_gil.holder.thread_ids", "int[]",
    "Host thread ids that held the GIL during the wait, longest overlap first.")
HOLDER_NAMES = Attribute(
    "otel_gil.holder.thread_names", "string[]", "Names of those threads, same order.")
HOLDER_HELD_NS = Attribute(
    "otel_gil.holder.held_ns", "int[]",
    "How long each of those threads held the GIL within the wait, same order.")
HOLDERS_TRUNCATED = Attribute(
    "otel_gil.holder.truncated", "bool",
    "True when more threads held the GIL during the wait than the event records.")
CLOCK_UNCERTAINTY_NS = Attribute(
    "otel_gil.clock.uncertainty_ns", "int",
    "Uncertainty of the monotonic-to-wall-clock conversion applied to start and end.")
LINK_ROLE = Attribute(
    "otel_gil.link.role", "string", "On a span link: 'holder' for the span a holder was in.")
LINK_HELD_NS = Attribute(
    "otel_gil.link.held_ns", "int", "On a span link: how long that holder held the GIL.")

# Holder stacks (otel_gil/stacks/store.py): on gil.hold, the holder's own stack; on
# a gil.wait at or above the stack threshold, the stack of the hold that
# overlapped it longest (of those whose stack was taken). Innermost first.
CODE_STACKTRACE = Attribute(
    "code.stacktrace", "string",
    "The holder's stack as a Python traceback prints it (most recent call last), then "
    "its native frames as `[native] function in object` lines, innermost last.")
CODE_FUNCTION_NAME = Attribute(
    "code.function.name", "string",
    "On gil.hold: the innermost Python function (co_qualname) the holder was in.")
CODE_FILE_PATH = Attribute(
    "code.file.path", "string", "On gil.hold: that function's source file (co_filename).")
CODE_LINE_NUMBER = Attribute(
    "code.line.number", "int", "On gil.hold: the line the holder was on in it.")
STACK_PY_FUNCTIONS = Attribute(
    "otel_gil.holder.stack.python.functions", "string[]",
    "The holder's Python frames' functions (co_qualname), innermost first.")
STACK_PY_FILES = Attribute(
    "otel_gil.holder.stack.python.files", "string[]", "Their source files, same order.")
STACK_PY_LINES = Attribute(
    "otel_gil.holder.stack.python.lines", "int[]",
    "Their current lines, same order (the first line, co_firstlineno, where the line "
    "table has none for the instruction).")
STACK_NATIVE_FUNCTIONS = Attribute(
    "otel_gil.holder.stack.native.functions", "string[]",
    "The holder's native frames' functions, innermost first ('?' where no symbol covers "
    "the address).")
STACK_NATIVE_OBJECTS = Attribute(
    "otel_gil.holder.stack.native.objects", "string[]",
    "The ELF object (path as mapped) of each native frame, same order.")
STACK_TAKEN = Attribute(
    "otel_gil.holder.stack.taken", "string",
    "When the stack was taken: 'blocked' (as the holder blocked holding the GIL) or "
    "'sample' (a CPU sample while it held it).")
STACK_UNWIND = Attribute(
    "otel_gil.holder.stack.native_unwind", "string",
    "How the native frames were found: 'cfi' (.eh_frame, exact), 'frame pointers' "
    "(the kernel's walk), or 'none'.")
STACK_THREAD = Attribute(
    "otel_gil.holder.stack.thread_id", "int",
    "On gil.wait: the host thread id of the holder whose stack this is.")
LINK_PY_FUNCTION = Attribute(
    "otel_gil.link.python.function", "string",
    "On a holder link: the holder's innermost Python function, as `function (file:line)`.")
LINK_NATIVE_FUNCTION = Attribute(
    "otel_gil.link.native.function", "string",
    "On a holder link: the holder's innermost native function with a symbol.")
STACK_ATTRIBUTES: Tuple[Attribute, ...] = (
    CODE_STACKTRACE, CODE_FUNCTION_NAME, CODE_FILE_PATH, CODE_LINE_NUMBER,
    STACK_PY_FUNCTIONS, STACK_PY_FILES, STACK_PY_LINES, STACK_NATIVE_FUNCTIONS,
    STACK_NATIVE_OBJECTS, STACK_TAKEN, STACK_UNWIND, STACK_THREAD, LINK_PY_FUNCTION,
    LINK_NATIVE_FUNCTION,
)

ATTRIBUTES: Tuple[Attribute, ...] = (
    THREAD_ID, THREAD_NAME, PROCESS_PID, THREAD_NATIVE_ID, THREAD_HOST_ID, PROCESS_HOST_PID,
    WAIT_NS, HOLD_NS, HOLDER_TIDS, HOLDER_NAMES, HOLDER_HELD_NS, HOLDERS_TRUNCATED,
    CLOCK_UNCERTAINTY_NS, LINK_ROLE, LINK_HELD_NS, *STACK_ATTRIBUTES,
)

# ------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    name: str
    instrument: str  # "histogram", "counter", "gauge"
    unit: str  # UCUM
    doc: str

    @property
    def prometheus(self) -> str:
        """The series name the Prometheus exporter derives (dots -> underscores, unit
        suffix, ``_total`` on counters), as users will type it in PromQL."""
        base = self.name.replace(".", "_")
        suffix = {"s": "_seconds", "{acquisition}": "", "{handoff}": "", "{switch}": "",
                  "{event}": "", "{span}": "", "{thread}": "",
                  "{error}": "", "1": "_ratio"}.get(self.unit, "")
        if suffix and not base.endswith(suffix):
            base += suffix
        if self.instrument == "counter":
            base += "_total"
        return base


WAIT_DURATION = Metric(
    "otel_gil.wait.duration", "histogram", "s",
    "Duration of every GIL wait (take_gil entry to return), from the kernel's per-thread "
    "histograms: every acquisition, not only the waits above the span threshold. Bucket "
    "boundaries are kernel bucket edges within 8% of a 1-2-5 series from 1 µs to 10 s "
    "(1 ms is 0.001048576); exemplars point at `gil.wait` spans.")
HOLD_DURATION = Metric(
    "otel_gil.hold.duration", "histogram", "s",
    "Duration of every GIL hold (acquisition to release), from the kernel's per-thread "
    "histograms, same buckets; exemplars point at `gil.hold` spans. Where the probe set "
    "keeps no per-transition hold histogram, only the holds above the span threshold.")
HELD_TIME = Metric(
    "otel_gil.held", "counter", "s", "Total time threads held the GIL.")
WAITED_TIME = Metric(
    "otel_gil.waited", "counter", "s", "Total time threads waited for the GIL.")
ACQUISITIONS = Metric(
    "otel_gil.acquisitions", "counter", "{acquisition}", "GIL acquisitions (take_gil returns).")
HANDOFFS = Metric(
    "otel_gil.handoffs", "counter", "{handoff}",
    "Acquisitions by a different thread than the previous holder.")
FORCED_SWITCHES = Metric(
    "otel_gil.forced_switches", "counter", "{switch}",
    "Hand-offs forced by a drop request. CPython asks the holder to drop the GIL only "
    "after a waiter has waited one switch interval (5 ms), so a hand-off that ends a hold, "
    "or a wait, of at least the interval is counted as forced.")
LOST_EVENTS = Metric(
    "otel_gil.lost_events", "counter", "{event}",
    "Events the kernel could not deliver (ring buffer full), probe runs it skipped "
    "(recursion_misses), and records user space could not decode.")
SPANS_EXPORTED = Metric(
    "otel_gil.spans.exported", "counter", "{span}",
    "`gil.wait`/`gil.hold` spans the OTLP exporter delivered.")
SPANS_DROPPED = Metric(
    "otel_gil.spans.dropped", "counter", "{span}",
    "`gil.wait`/`gil.hold` spans the sidecar decided to emit and could not deliver, by "
    "`reason`: `queue_full` (the export queue was at its memory bound), `export_failed` "
    "(the exporter gave up: endpoint down, refused, an error status), `timeout` (the "
    "exporter gave up waiting for an answer, DEADLINE_EXCEEDED or timed out: a "
    "black-holed endpoint), `shutdown` (still queued when the sidecar exited and its "
    "last flush ran out of time).")
SPANS_SKIPPED = Metric(
    "otel_gil.spans.skipped", "counter", "{span}",
    "Waits/holds above the threshold not turned into spans, by design, by `reason`: "
    "`outside_span` (no span active on the thread: it would be an orphan), `unsampled` "
    "(under an unsampled parent), `across_spans` (a hold that began under another span).")
CONTEXT_UNPLACED = Metric(
    "otel_gil.context.unplaced_threads", "counter", "{thread}",
    "App threads that found no free slot in the app's context table: their waits have "
    "no parent span, so they are skipped as `outside_span`.")
CONTEXT_ERRORS = Metric(
    "otel_gil.context.errors", "counter", "{error}",
    "Exceptions the app's context publishing swallowed (the app carried on; that thread "
    "published no context until its next switch).")
STACKS_LOST = Metric(
    "otel_gil.stacks.lost", "counter", "{stack}",
    "Holder stacks taken or wanted but not attached to a hold, by `reason`: `ring_full` "
    "(the kernel could not send it), `evicted` (a hold named it after newer ones "
    "had replaced it), `undecodable` (a record or the target's memory could not be "
    "decoded), `unknown_process` (its process was no longer traced). The hold and its "
    "spans are still exported, without the stack.")
CONTENTION_RATIO = Metric(
    "otel_gil.contention.ratio", "gauge", "1",
    "Per process: time threads spent waiting for the GIL over wall time, since the last "
    "collection. Above 1 means several threads wait at once.")

METRICS: Tuple[Metric, ...] = (
    WAIT_DURATION, HOLD_DURATION, HELD_TIME, WAITED_TIME, ACQUISITIONS, HANDOFFS,
    FORCED_SWITCHES, LOST_EVENTS, SPANS_EXPORTED, SPANS_DROPPED, SPANS_SKIPPED,
    CONTEXT_UNPLACED, CONTEXT_ERRORS, STACKS_LOST, CONTENTION_RATIO,
)

# Metric attribute (label) keys. Thread names are bounded by
# OTEL_PYTHON_GIL_MAX_THREAD_LABELS; the rest fold into "other".
LABEL_SERVICE = "service.name"
LABEL_PID = "process.pid"
LABEL_THREAD = "thread.name"
LABEL_SPAN = "span.name"  # the span pipeline's counters: gil.wait or gil.hold
LABEL_REASON = "reason"  # why a span (or a holder stack) was dropped or skipped
LABELS: Tuple[str, ...] = (LABEL_SERVICE, LABEL_PID, LABEL_THREAD, LABEL_SPAN, LABEL_REASON)
OTHER_THREADS = "other"

INSTRUMENTATION_SCOPE = "otel_gil"

# ------------------------------------------------------------------------ views
# Names in the files `record --timeline/--html` write (otel_gil/views): the
# timeline's slices are named after the spans (gil.wait, gil.hold).


@dataclass(frozen=True)
class ViewName:
    name: str
    where: str
    doc: str


VIEW_CATEGORY = ViewName(
    "otel_gil", "timeline `cat`", "Category of every hold and wait slice and every flow.")
VIEW_FLOW = ViewName(
    "gil.holder", "timeline flow event `name`",
    "An arrow from a hold to a wait it overlapped: the holder kept the waiter waiting.")
VIEW_ARG_STACK = ViewName(
    "holder.stack", "timeline slice `args`",
    "The holder's stack, one label per frame, innermost first: on a hold, its own; on a "
    "wait, that of the holder the wait is mostly charged to.")
VIEW_ARG_FRAMES = ViewName(
    "holder.frames", "timeline slice `args`",
    "The same stack as structured frames: {kind, function, file, object, line}.")
VIEW_ARG_CAUSED = ViewName(
    "caused_wait_ns", "timeline slice `args`",
    "On a hold: the wait of other threads charged to it, nanoseconds.")
VIEW_ARG_HOLDERS = ViewName(
    "holders", "timeline slice `args`",
    "On a wait: each hold that overlapped it, {tid, thread, held_ns} (its stack is on the "
    "hold's slice).")
VIEW_ARG_TRUNCATED = ViewName(
    "holders_truncated", "timeline slice `args`",
    "On a wait: more hand-offs happened during it than the record keeps.")
VIEW_NAMES: Tuple[ViewName, ...] = (
    VIEW_CATEGORY, VIEW_FLOW, VIEW_ARG_STACK, VIEW_ARG_FRAMES, VIEW_ARG_CAUSED,
    VIEW_ARG_HOLDERS, VIEW_ARG_TRUNCATED,
)


def markdown() -> str:
    """The documented table of every emitted name (docs/names.md)."""
    out = ["# Names otel-gil emits", "",
           "Generated by `python -m otel_gil.names`; a test keeps it in step with",
           "`otel_gil/names.py`.", "", "## Spans", "", "| name | meaning |", "|---|---|"]
    out += [f"| `{s.name}` | {s.doc} |" for s in SPANS]
    out += ["", "## Span attributes", "", "| name | type | meaning |", "|---|---|---|"]
    out += [f"| `{a.name}` | {a.type} | {a.doc} |" for a in ATTRIBUTES]
    out += ["", "## Metrics", "",
            "| name | Prometheus series | instrument | unit | meaning |", "|---|---|---|---|---|"]
    out += [f"| `{m.name}` | `{m.prometheus}` | {m.instrument} | `{m.unit}` | {m.doc} |"
            for m in METRICS]
    out += ["", "Metric labels: " + ", ".join(f"`{label}`" for label in LABELS)
            + f". Thread names beyond the cardinality bound are reported as `{OTHER_THREADS}`. "
            f"`{LABEL_SERVICE}` and `{LABEL_PID}` are on every metric, `{LABEL_THREAD}` on "
            f"the per-thread ones (durations, held, waited, acquisitions), `{LABEL_SPAN}` and "
            f"`{LABEL_REASON}` on the span pipeline's counters.", ""]
    out += ["## In the timeline view", "",
            f"Slices are named `{GIL_WAIT.name}` and `{GIL_HOLD.name}`, like the spans "
            "(`otel-gil record --timeline`, docs/views.md).", "",
            "| name | where | meaning |", "|---|---|---|"]
    out += [f"| `{v.name}` | {v.where} | {v.doc} |" for v in VIEW_NAMES]
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
