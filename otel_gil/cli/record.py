"""`otel-gil record` and `otel-gil top`: trace running processes, print per-thread GIL use."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Callable, Optional

from otel_gil import views
from otel_gil.cli import report
from otel_gil.cli.base import Command, count_arg, positive_float, require_root
from otel_gil.cli.common import add_probe_options, announce, follow, probe_config, write_record
from otel_gil.cli.views import add_view_options, view_files, write_views
from otel_gil.errors import GilDisabledError, OtelGilError
from otel_gil.probes.config import program_text
from otel_gil.probes.session import DEFAULT_MAX_INTERVALS, Session
from otel_gil.target.process import GIL_DISABLED_REMEDY


class _Stop:
    """Set by SIGINT/SIGTERM; the loop then detaches cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True


def trace(args: argparse.Namespace, each_second: Optional[Callable[[Session], None]] = None,
          ) -> Session:
    """Attach to every --pid, then run until --duration, the targets exit, or a signal."""
    if not args.pid:
        raise OtelGilError("no target", "give at least one --pid PID")
    require_root()
    stop = _Stop()
    session = Session(probe_config(args),
                      max_intervals=getattr(args, "max_intervals", DEFAULT_MAX_INTERVALS))
    try:
        for pid in args.pid:
            announce(session.add(pid), probes=session.probe_set)
        follow(session, lambda: stop.requested, args.duration, each_second)
    finally:
        session.close()
    if not session.traced:  # every target kept its GIL disabled throughout
        raise GilDisabledError("GIL disabled: nothing to measure (it stayed disabled while "
                               "watched)", remedy=GIL_DISABLED_REMEDY)
    return session


class RecordCommand(Command):
    name = "record"
    help = "trace running Python processes and print per-thread GIL hold and wait"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        add_probe_options(parser)
        parser.add_argument("--duration", "-d", type=positive_float, default=None,
                            help="seconds to trace (default: until the targets exit or Ctrl-C)")
        parser.add_argument("--output", "-o", default=None,
                            help="write the full record as JSON here (docs/record-json.md)")
        add_view_options(parser)
        parser.add_argument("--max-intervals", type=count_arg, default=DEFAULT_MAX_INTERVALS,
                            help="keep at most this many waits/holds one by one (default "
                                 f"{DEFAULT_MAX_INTERVALS}); the rest are counted, and still "
                                 "in the totals")

    def run(self, args: argparse.Namespace) -> int:
        if args.dump_bpf:
            print(program_text(probe_config(args)))
            return 0
        write_record(trace(args), args.output, view_files(args))
        return 0


class TopCommand(Command):
    name = "top"
    help = "live per-thread GIL table of running processes, refreshed every second"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        add_probe_options(parser)
        parser.add_argument("--duration", "-d", type=positive_float, default=None,
                            help="seconds to run (default: until the targets exit or Ctrl-C)")
        add_view_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        def redraw(session: Session) -> None:
            doc = report.to_json(session)
            sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
            sys.stdout.write(report.table(doc) + "\n")
            sys.stdout.flush()

        session = trace(args, each_second=redraw)
        doc = report.to_json(session)
        rec = views.from_record(doc)
        print(report.table(doc) + "\n\n" + report.holders_table(rec))
        write_views(rec, view_files(args))
        return 0
