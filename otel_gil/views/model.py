"""What every view is drawn from: threads, their hold and wait slices, and for
each wait the holders it was charged to, each with the holder's stack.

A *holder stack* is a tuple of Frames, innermost first. A frame is one of:

- ``python``: a Python function, with its file and (optionally) line;
- ``native``: a C function, with the object (ELF file) it came from;
- ``span``: synthetic, the name of the OpenTelemetry span the holder was in;
- ``thread``: synthetic, the holder's thread, always the outermost frame;
- ``missing``: synthetic, the only frame of a share whose holder is not known.

Captured frames (otel_gil/stacks/store.py, docs/stacks.md) come from the record's
``stack`` list on a hold (docs/record-json.md); a hold without one is its
thread, topped by the span it was in where that span's name is known (the
demo's spans; a record knows span ids, not names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from otel_gil.trust import printable

FRAME_KINDS = ("python", "native", "span", "thread", "missing")


@dataclass(frozen=True)
class Frame:
    kind: str  # one of FRAME_KINDS
    function: str
    file: Optional[str] = None  # python: the source file
    object: Optional[str] = None  # native: the ELF object
    line: Optional[int] = None  # python, when known

    def label(self) -> str:
        """One line naming the frame, as the flame graph and folded stacks show it."""
        if self.kind == "python":
            where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
            return f"{self.function} ({where})" if self.file else self.function
        if self.kind == "native" and self.object:
            return f"{self.function} [{self.object.rsplit('/', 1)[-1]}]"
        return self.function


Stack = Tuple[Frame, ...]  # innermost first
SliceKey = Tuple[str, int, int]  # (kind, tid, start_ns): one slice of a Recording

# The synthetic stacks of shares whose holder is not known.
NOT_RECORDED: Stack = (Frame("missing", "[holders not recorded: too many hand-offs]"),)
UNKNOWN_HOLDER: Stack = (Frame("missing", "[holder unknown]"),)


def thread_frame(name: str) -> Frame:
    return Frame("thread", f"thread {name}")


def span_frame(name: str) -> Frame:
    return Frame("span", f"span {name}")


@dataclass(frozen=True)
class Thread:
    pid: int
    tid: int
    name: str


@dataclass(frozen=True)
class Share:
    """The part of one wait charged to one holder: how long that holder held
    the GIL within the wait, and its stack (full, synthetic frames included)."""

    tid: int
    held_ns: int
    stack: Stack
    source: Optional["SliceKey"] = None  # the hold (or holder's span) slice, when known


@dataclass(frozen=True)
class Slice:
    """A hold or a wait on one thread; or, in the demo, a span a holder was in."""

    kind: str  # "hold", "wait", "span"
    pid: int
    tid: int
    start_ns: int
    end_ns: int
    name: str = ""  # spans: the span's name
    stack: Stack = ()  # holds: the holder's full stack
    shares: Tuple[Share, ...] = ()  # waits
    truncated: bool = False  # waits: more hand-offs happened than the record keeps
    trace_id: Optional[str] = None
    span_id: Optional[str] = None

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def key(self) -> SliceKey:
        return (self.kind, self.tid, self.start_ns)


@dataclass
class Recording:
    """Everything the views need, in one clock (ns), sorted by start."""

    title: str
    clock: str
    origin_ns: int  # the time shown as 0
    end_ns: int
    threads: Dict[int, Thread] = field(default_factory=dict)  # by tid
    processes: Dict[int, str] = field(default_factory=dict)  # pid -> what it runs
    slices: List[Slice] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # what is missing, in words

    @property
    def waits(self) -> List[Slice]:
        return [s for s in self.slices if s.kind == "wait"]

    def thread_name(self, tid: int) -> str:
        t = self.threads.get(tid)
        return t.name if t is not None else f"tid {tid}"


def thread_labels(threads: Dict[int, Thread]) -> Dict[int, str]:
    """The name each thread frame shows: its name, with the tid added where two
    threads share a name (before CPython 3.14 every unnamed thread's OS name is
    the executable's, e.g. all "python3.11")."""
    count: Dict[str, int] = {}
    for t in threads.values():
        count[t.name] = count.get(t.name, 0) + 1
    return {t.tid: t.name if count[t.name] == 1 else f"{t.name} [tid {t.tid}]"
            for t in threads.values()}


# ------------------------------------------------------------ captured frames

MAX_FRAMES = 128  # a bound on what a record may ask us to draw per stack


def text(value: Any) -> Optional[str]:
    """A string from a record, made printable; None for anything else."""
    return printable(value) if isinstance(value, str) else None


def parse_frame(raw: Any) -> Optional[Frame]:
    """One captured frame from a record ({kind, function, file|object, line}),
    or None if it is not one (a record is data: never trusted to be well-formed)."""
    if not isinstance(raw, dict):
        return None
    kind, function = raw.get("kind"), text(raw.get("function"))
    if kind not in ("python", "native") or not function:
        return None
    line = raw.get("line")
    return Frame(kind, function, file=text(raw.get("file")), object=text(raw.get("object")),
                 line=line if isinstance(line, int) and not isinstance(line, bool) else None)


def parse_stack(raw: Any) -> Stack:
    """Captured frames, innermost first; what is not a frame is left out."""
    if not isinstance(raw, list):
        return ()
    frames = (parse_frame(f) for f in raw[:MAX_FRAMES])
    return tuple(f for f in frames if f is not None)


def holder_stack(captured: Stack, thread_label: str, span_name: Optional[str] = None) -> Stack:
    """A holder's full stack: its captured frames, then the span it was in (when
    its name is known), then its thread, outermost."""
    outer = (span_frame(span_name),) if span_name else ()
    return captured + outer + (thread_frame(thread_label),)
