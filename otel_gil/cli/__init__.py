"""`otel-gil`: one class per subcommand; main() turns OtelGilError into one line
on stderr and an exit status, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence, Type

from otel_gil import __version__
from otel_gil.cli.base import Command
from otel_gil.cli.demo import DemoCommand
from otel_gil.cli.doctor import DoctorCommand
from otel_gil.cli.record import RecordCommand, TopCommand
from otel_gil.cli.run import RunCommand
from otel_gil.cli.sidecar import SidecarCommand
from otel_gil.errors import OtelGilError
from otel_gil.trust import printable_text

COMMANDS: List[Type[Command]] = [DoctorCommand, RecordCommand, TopCommand, SidecarCommand,
                                 DemoCommand, RunCommand]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-gil",
        description="Measure CPython GIL waits and holds with eBPF uprobes.")
    parser.add_argument("--version", action="version", version=f"otel-gil {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cls in COMMANDS:
        cmd = cls()
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.prepare_parser(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()  # option defaults come from OTEL_PYTHON_GIL_* (config.load)
    except ValueError as err:
        print(f"otel-gil: error: {err} (fix or unset that variable)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    try:
        return int(args._command.run(args))
    except OtelGilError as err:  # it may quote what a process or its files hold
        print(f"otel-gil: error: {printable_text(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


class PrintableFormatter(logging.Formatter):
    """Log lines with no control characters but their newlines: a sidecar logs
    what clients and traced processes send it (a service name, a comm)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable_text(super().format(record))


def entry_point() -> None:
    sys.exit(main())
