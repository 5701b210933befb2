"""The view options of `record`, `run` and `top` (--flamegraph, --folded,
--speedscope, --timeline, --html): parsed here, written at the end from the
finished record (otel_gil/views)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional

from otel_gil import views
from otel_gil.errors import OtelGilError

VIEW_OPTIONS = (
    ("flamegraph", "an SVG flame graph of the holders' stacks, weighted by the wait they "
                   "caused others"),
    ("folded", "the same as folded stacks (root;...;leaf microseconds), for flamegraph.pl, "
               "inferno or speedscope"),
    ("speedscope", "the same as speedscope JSON (open it at speedscope.app)"),
    ("timeline", "a Chrome Trace Event JSON timeline: a track per thread, hold and wait "
                 "slices, arrows from holders to the waits they caused (ui.perfetto.dev, "
                 "chrome://tracing)"),
    ("html", "one self-contained HTML page with the timeline and the flame graph"),
)


def output_path(text: str) -> str:
    """A path a file can be written at: checked before tracing, not after it."""
    directory = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"no directory {directory!r} to write {text!r} in")
    if not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {directory!r}")
    return text


def add_view_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("views of who held the GIL while others waited "
                                      "(docs/views.md)")
    for kind, text in VIEW_OPTIONS:
        group.add_argument(f"--{kind}", metavar="FILE", type=output_path, default=None,
                           help=f"write {text}")


def view_files(args: argparse.Namespace) -> Dict[str, str]:
    """View kind -> path, for the options given."""
    return {kind: getattr(args, kind) for kind, _ in VIEW_OPTIONS
            if getattr(args, kind, None)}


def write_views(rec: views.Recording, files: Optional[Dict[str, str]]) -> None:
    """Write the views of a finished record; OtelGilError if one cannot be written."""
    if not files:
        return
    for kind, path in files.items():
        try:
            views.write(rec, {kind: path})
        except OSError as exc:
            raise OtelGilError(f"cannot write {path}: {exc.strerror}",
                               f"choose a writable --{kind} path") from None
        print(f"{kind} written to {path}", file=sys.stderr)
