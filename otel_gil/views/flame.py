"""Held-while-others-waited stacks as folded text (Brendan Gregg's format, for
flamegraph.pl, inferno, speedscope), speedscope JSON, and the tree the SVG
flame graph is drawn from. Weights are microseconds of others' wait.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from otel_gil.views.blame import held_while_waited
from otel_gil.views.model import Frame, Recording

SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"
PROFILE_NAME = "GIL held while others waited"


def _us(ns: int) -> int:
    return (ns + 500) // 1000


def _folded_frame(label: str) -> str:
    """';' separates frames and the last ' ' the weight (flamegraph.pl's
    stackcollapse format): neither a ';' nor a line break may be in a frame."""
    return label.replace(";", ",").replace("\n", " ").replace("\r", " ")


def folded(rec: Recording) -> str:
    """One line per holder stack: `outermost;...;innermost weight_us`, heaviest first.
    Stacks charged less than half a microsecond in all are left out."""
    lines = []
    for b in held_while_waited(rec):
        us = _us(b.waited_ns)
        if us > 0:
            path = ";".join(_folded_frame(f.label()) for f in reversed(b.stack))
            lines.append(f"{path} {us}")
    return "".join(line + "\n" for line in lines)


def _speedscope_frame(frame: Frame) -> Dict[str, Any]:
    if frame.kind == "python":
        out: Dict[str, Any] = {"name": frame.function}
        if frame.file:
            out["file"] = frame.file
        if frame.line is not None:
            out["line"] = frame.line
        return out
    if frame.kind == "native" and frame.object:
        return {"name": frame.function, "file": frame.object}
    return {"name": frame.function}


def speedscope(rec: Recording) -> Dict[str, Any]:
    """A speedscope file: one sampled profile, a sample per holder stack (root
    first, as speedscope's SampledStack wants), weighted in microseconds."""
    frames: List[Dict[str, Any]] = []
    index: Dict[Frame, int] = {}
    samples, weights = [], []
    for b in held_while_waited(rec):
        us = _us(b.waited_ns)
        if us <= 0:
            continue
        sample = []
        for frame in reversed(b.stack):
            if frame not in index:
                index[frame] = len(frames)
                frames.append(_speedscope_frame(frame))
            sample.append(index[frame])
        samples.append(sample)
        weights.append(us)
    name = PROFILE_NAME + (f" ({'; '.join(rec.notes)})" if rec.notes else "")
    return {
        "$schema": SPEEDSCOPE_SCHEMA,
        "name": rec.title,
        "exporter": "otel-gil",
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": [{"type": "sampled", "name": name, "unit": "microseconds",
                      "startValue": 0, "endValue": sum(weights),
                      "samples": samples, "weights": weights}],
    }


def speedscope_text(rec: Recording) -> str:
    return json.dumps(speedscope(rec), indent=None, separators=(",", ":")) + "\n"


# ------------------------------------------------------------------ the tree


@dataclass
class Node:
    """A frame in the merged tree of holder stacks, outermost at the root."""

    frame: Optional[Frame]  # None at the root
    ns: int = 0
    children: Dict[Frame, "Node"] = field(default_factory=dict)

    def child(self, frame: Frame) -> "Node":
        node = self.children.get(frame)
        if node is None:
            node = self.children[frame] = Node(frame)
        return node

    def ordered(self) -> List["Node"]:
        """Children by label, as flamegraph.pl orders them: the x order means
        nothing, and alphabetical keeps two graphs of the same code comparable."""
        return sorted(self.children.values(),
                      key=lambda n: (n.frame.label() if n.frame else "", n.frame.kind
                                     if n.frame else ""))

    @property
    def depth(self) -> int:
        return 1 + max((c.depth for c in self.children.values()), default=0)


def tree(rec: Recording) -> Node:
    root = Node(None)
    for b in held_while_waited(rec):
        root.ns += b.waited_ns
        node = root
        for frame in reversed(b.stack):
            node = node.child(frame)
            node.ns += b.waited_ns
    return root


def paths(root: Node) -> List[Tuple[Tuple[str, ...], int]]:
    """Every node as (labels from the root, ns): what the flame graph draws."""
    out: List[Tuple[Tuple[str, ...], int]] = []

    def walk(node: Node, prefix: Tuple[str, ...]) -> None:
        for c in node.ordered():
            path = prefix + (c.frame.label() if c.frame else "",)
            out.append((path, c.ns))
            walk(c, path)

    walk(root, ())
    return out
