"""Views of a finished record: who held the GIL while others waited.

    rec = views.from_record(doc)          # doc: what `otel-gil record --output` writes
    rec = views.from_spans(spans)         # or the gil.* spans a receiver got (the demo)
    text = views.render("flamegraph", rec)

Five formats (RENDERERS): folded stacks, speedscope JSON, an SVG flame graph,
a Chrome Trace Event timeline, and one HTML page with the timeline and the
flame graph. All are pure functions of a Recording (model.py); no BCC, no I/O
but write(). What each shows and how it is weighed: docs/views.md.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Mapping

from otel_gil.views import flame, html, svg, trace
from otel_gil.views.blame import Blamed, held_while_waited
from otel_gil.views.model import Frame, Recording, Stack
from otel_gil.views.record import from_record
from otel_gil.views.spans import from_spans

__all__ = ["RENDERERS", "Blamed", "Frame", "Recording", "Stack", "from_record", "from_spans",
           "held_while_waited", "render", "write"]

RENDERERS: Dict[str, Callable[[Recording], str]] = {
    "folded": flame.folded,
    "speedscope": flame.speedscope_text,
    "flamegraph": svg.render,
    "timeline": trace.timeline_text,
    "html": html.page,
}


def render(kind: str, rec: Recording) -> str:
    return RENDERERS[kind](rec)


def write(rec: Recording, files: Mapping[str, str]) -> None:
    """Write each view kind -> path; a file is replaced whole (written beside
    it, then renamed), so a reader never sees half of it. Raises OSError."""
    for kind, path in files.items():
        text = render(kind, rec)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
