"""What the tracing commands share: the probe options, the probe settings they
give, the start-up line, the tracing loop, and the record's table, JSON and
views (record, top, run; sidecar and demo take the probe-set option)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, Optional

from otel_gil import views
from otel_gil.cli import report
from otel_gil.cli.base import pid_arg, positive_float
from otel_gil.cli.stack_options import add_stack_threshold_option, stack_settings
from otel_gil.cli.views import write_views
from otel_gil.config import DEFAULT_HOLD_THRESHOLD_MS, DEFAULT_WAIT_THRESHOLD_MS
from otel_gil.errors import OtelGilError
from otel_gil.probes.config import DEFAULT_PROBE_SET, PROBE_SETS, ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.target.process import Target


def add_probe_options(parser: argparse.ArgumentParser, pids: bool = True) -> None:
    if pids:
        parser.add_argument("--pid", "-p", type=pid_arg, action="append", default=[],
                            help="process to trace (repeat for several)")
    parser.add_argument("--wait-threshold-ms", type=positive_float,
                        default=DEFAULT_WAIT_THRESHOLD_MS,
                        help="waits at least this long are recorded one by one "
                             f"(default {DEFAULT_WAIT_THRESHOLD_MS:g})")
    parser.add_argument("--hold-threshold-ms", type=positive_float,
                        default=DEFAULT_HOLD_THRESHOLD_MS,
                        help="holds at least this long are recorded one by one "
                             f"(default {DEFAULT_HOLD_THRESHOLD_MS:g})")
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
    return ProbeConfig.from_ms(args.wait_threshold_ms, args.hold_threshold_ms,
                               probes=args.probes, **stack_settings(args.stack_threshold_ms))


def announce(target: Target, how: str = "Ctrl-C to stop", probes: str = DEFAULT_PROBE_SET) -> None:
    interp = target.interpreter
    verb = "watching" if target.gil.enabled is False else "tracing"  # Session said why
    print(f"otel-gil: {verb} pid {target.pid} (CPython {'.'.join(map(str, interp.version))}"
          f"{' free-threaded' if interp.free_threaded else ''}, take_gil via "
          f"{interp.symbol_source}; probes: {probes}); {how}", file=sys.stderr, flush=True)
    if interp.unverified:
        print(f"otel-gil: warning: {interp.unverified}", file=sys.stderr, flush=True)


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
