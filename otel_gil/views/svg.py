"""A self-contained SVG flame graph of "held while others waited".

One rectangle per frame of the merged holder stacks, the root (all waits) at
the bottom, each frame as wide as the wait charged to it; a label where it
fits, and a <title> (the browser's hover tooltip) with the full name and
figures. No script, no external font or stylesheet: it renders the same alone,
inside the HTML view, or in an <img>.
"""

from __future__ import annotations

import zlib
from typing import List, Optional
from xml.sax.saxutils import escape, quoteattr

from otel_gil.views.flame import Node, tree
from otel_gil.views.model import Frame, Recording

WIDTH = 1200
PAD = 10
ROW = 18  # height of a frame row, px
FONT = 12  # px
CHAR_W = 7.3  # advance of one character at FONT px in a monospace face, px
MIN_W = 0.3  # frames narrower than this (px) are not drawn

# A hue range and lightness per kind: Python warm, native red, synthetic cool.
PALETTE = {
    "python": (30, 55, 62),
    "native": (0, 20, 62),
    "span": (95, 140, 58),
    "thread": (195, 225, 68),
    "missing": (0, 0, 80),
}


def color(frame: Optional[Frame]) -> str:
    """A stable colour: the kind's hue range, the position in it from the name."""
    if frame is None:
        return "rgb(200,200,200)"
    low, high, light = PALETTE.get(frame.kind, (0, 0, 75))
    h = zlib.crc32(frame.function.encode("utf-8", "replace"))
    hue = low + (h % 1000) / 1000 * (high - low)
    sat = 0 if frame.kind == "missing" else 70 + (h >> 10) % 20
    return f"hsl({hue:.0f},{sat}%,{light + (h >> 16) % 8}%)"


def fit(label: str, width: float) -> str:
    """As much of the label as fits in width px ('..' marks a cut), or ''."""
    chars = int((width - 6) / CHAR_W)
    if chars >= len(label):
        return label
    return label[: chars - 2] + ".." if chars >= 4 else ""


def _ms(ns: int) -> str:
    return f"{ns / 1e6:,.3f} ms"


class _Canvas:
    def __init__(self, total_ns: int, depth: int, header_lines: int) -> None:
        self.total = total_ns
        self.top = PAD + 28 + 16 * header_lines  # below the last header line
        self.height = self.top + depth * ROW + PAD + 20
        self.scale = (WIDTH - 2 * PAD) / total_ns if total_ns else 0.0
        self.out: List[str] = []

    def frame(self, node: Node, x: float, level: int, title: str) -> None:
        w = node.ns * self.scale
        if w < MIN_W:
            return
        y = self.height - PAD - 20 - (level + 1) * ROW
        label = node.frame.label() if node.frame else "all"
        kind = node.frame.kind if node.frame else "root"
        text = fit(label, w)
        self.out.append(
            f'<g class="frame" data-kind="{kind}"><title>{escape(title)}</title>'
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW - 1}" rx="2" '
            f'fill="{color(node.frame)}"/>'
            + (f'<text x="{x + 3:.2f}" y="{y + ROW - 5}">{escape(text)}</text>' if text else "")
            + "</g>")

    def walk(self, node: Node, x: float, level: int) -> None:
        label = node.frame.label() if node.frame else "all holders"
        pct = 100.0 * node.ns / self.total if self.total else 0.0
        self.frame(node, x, level, f"{label}\n{_ms(node.ns)} of others' wait ({pct:.1f}%)")
        for child in node.ordered():
            self.walk(child, x, level + 1)
            x += child.ns * self.scale


def render(rec: Recording, title: str = "GIL held while others waited") -> str:
    """The SVG file: the XML declaration and the <svg> element."""
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + element(rec, title)


def element(rec: Recording, title: str = "GIL held while others waited") -> str:
    """The <svg> element alone, as the HTML view inlines it."""
    root = tree(rec)
    header = [f"{len(rec.waits)} waits, {_ms(root.ns)} of waiting charged to the holders "
              "that held the GIL meanwhile (width: wait caused; bottom: thread, top: innermost)"]
    header += [f"note: {n}" for n in rec.notes]
    if not root.ns:
        header.append("no wait over the threshold was recorded: nothing to draw")
    canvas = _Canvas(root.ns, root.depth if root.ns else 0, len(header))
    if root.ns:
        canvas.walk(root, PAD, 0)
    lines = [f'<text class="title" x="{WIDTH / 2}" y="{PAD + 14}" '
             f'text-anchor="middle">{escape(title)}</text>']
    lines += [f'<text class="sub" x="{PAD}" y="{PAD + 36 + 16 * i}">{escape(h)}</text>'
              for i, h in enumerate(header)]
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" class="flamegraph" width="{WIDTH}" '
        f'height="{canvas.height}" viewBox="0 0 {WIDTH} {canvas.height}" '
        f'font-family="monospace" font-size="{FONT}">',
        f"<title>{escape(rec.title)}: {escape(title)}</title>",
        "<style>text { fill: #000; pointer-events: none; } .title { font-size: 16px; } "
        ".sub { fill: #444; } g.frame:hover rect { stroke: #000; stroke-width: 1; }</style>",
        f'<rect width="100%" height="100%" fill={quoteattr("#fdfdf8")}/>',
        *lines, *canvas.out, "</svg>", ""])
