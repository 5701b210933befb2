"""`otel-gil record` and `otel-gil top`: trace running processes, print per-thread GIL use."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from types import FrameType
from typing import Callable, Dict, Optional

from otel_gil import report, views
from otel_gil.cli.base import Command, count_arg, pid_arg, positive_float, require_root
from otel_gil.cli.stack_options import add_stack_threshold_option, stack_settings
from otel_gil.cli.views import add_view_options, view_files, write_views
from otel_gil.discovery import GIL_DISABLED_REMEDY, Target
from otel_gil.errors import GilDisabledError, OtelGilError
from otel_gil.probes import DEFAULT_PROBE_SET, PROBE_SETS, ProbeConfig, program_text
from otel_gil.session import DEFAULT_MAX_INTERVALS, Session


class _Stop:
    """Set by SIGINT/SIGTERM; the loop then detaches cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = True


def add_probe_options(parser: argparse.ArgumentParser, pids: bool = True) -> None:
    if pids:
        parser.add_argument("--pid", "-p", type=pid_arg, action="append", default=[],
                            help="process to trace (repeat for several)")
    parser.add_argument("--wait-threshold-ms", type=positive_float, default=1.0,
                        help="waits at least this long are recorded one by one (default 1)")
    parser.add_argument("--hold-threshold-ms", type=positive_float, default=50.0,
                        help="holds at least this long are recorded one by one (default 50)")
    add_stack_threshold_option(parser)
    add_probe_set_option(parser)
    parser.add_argument("--dump-bpf", action="store_true",
                        help="print the BPF program as it would be compiled, and exit")


def add_probe_set_option(parser: argparse.ArgumentParser,
                         default: str = DEFAULT_PROBE_SET) -> None:
    parser.add_argument("--probes", choices=PROBE_SETS, default=default,
                        help="contended (default): probe only what runs when a thread must "
                             "wait, nothing on an uncontended hand-off; waits exact, holds only "
                             "while another thread waits. all: every acquisition and release "
                             "too (exact holds, ~1-2 µs per hand-off)")


def probe_config(args: argparse.Namespace) -> ProbeConfig:
    return ProbeConfig(wait_threshold_ns=int(args.wait_threshold_ms * 1e6),
                       hold_threshold_ns=int(args.hold_threshold_ms * 1e6),
                       probes=args.probes, **stack_settings(args.stack_threshold_ms))


def announce(target: Target, how: str = "Ctrl-C to stop", probes: str = DEFAULT_PROBE_SET) -> None:
    interp = target.interpreter
    verb = "watching" if target.gil.enabled is False else "tracing"  # Session said why
    print(f"otel-gil: {verb} pid {target.pid} (CPython {'.'.join(map(str, interp.version))}"
          f"{' free-threaded' if interp.free_threaded else ''}, take_gil via "
          f"{interp.symbol_source}; probes: {probes}); {how}", file=sys.stderr, flush=True)
    if interp.unverified:
        print(f"otel-gil: warning: {interp.unverified}", file=sys.stderr, flush=True)


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


def follow(session: Session, stop: Callable[[], bool], duration: Optional[float] = None,
           each_second: Optional[Callable[[Session], None]] = None) -> None:
    """Deliver events until duration seconds pass, the targets exit, or stop() is true."""
    deadline = time.monotonic() + duration if duration else None
    next_tick = time.monotonic() + 1
    while session.active and not stop():
        if deadline is not None and time.monotonic() >= deadline:
            break
        session.step(100)
        if each_second is not None and time.monotonic() >= next_tick:
            next_tick += 1
            each_second(session)


def write_record(session: Session, output: Optional[str],
                 files: Optional[Dict[str, str]] = None) -> None:
    """Print the per-thread table; with output, write the JSON record there too,
    and each view (kind -> path: otel_gil.cli.views)."""
    doc = report.to_json(session)
    rec = views.from_record(doc)
    print(report.table(doc) + "\n\n" + report.holders_table(rec), flush=True)
    if output:
        try:
            with open(output, "w") as f:
                json.dump(doc, f, indent=1)
        except OSError as exc:
            raise OtelGilError(f"cannot write {output}: {exc.strerror}",
                               "choose a writable --output path") from None
        print(f"full record written to {output}", file=sys.stderr)
    write_views(rec, files)


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
