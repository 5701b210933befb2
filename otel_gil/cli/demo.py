"""`otel-gil demo`: the demo app under otel-gil, real load, the slow requests'
GIL waits and their holders (otel_gil.dev.demo; the result: otel_gil.dev.report).
With --url: the load generator only."""

from __future__ import annotations

import argparse

from otel_gil.cli.base import Command, require_root
from otel_gil.cli.common import add_probe_set_option
from otel_gil.dev import demo, load
from otel_gil.errors import OtelGilError


def _duration(text: str) -> float:
    """Checked here rather than by argparse, so that bad input is one line."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise OtelGilError(f"--duration must be a number of seconds >= 0, not {text!r}",
                           "e.g. --duration 10; 0 runs until Ctrl-C")
    return value


class DemoCommand(Command):
    name = "demo"
    help = ("run examples/demo_app.py under otel-gil with real HTTP load and show the "
            "slowest requests' GIL waits and who held the GIL")

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--duration", "-d", default="10",
                            help="seconds of load (default 10; 0: until Ctrl-C)")
        parser.add_argument("--url", default=None,
                            help="only generate load against this running demo app "
                                 "(e.g. http://demo:8000) and print the request count")
        parser.add_argument("--output", "-o", default="out/demo.json",
                            help="where the machine-readable result goes (default out/demo.json)")
        add_probe_set_option(parser)

    def run(self, args: argparse.Namespace) -> int:
        duration = _duration(args.duration)
        if args.url:
            stats = load.load(args.url, duration)
            print(f"Sent {stats.line()} to {args.url}")
            return 0
        require_root()
        return demo.run(duration, args.output, probes=args.probes)
