"""`otel-gil sidecar`: trace the processes that register, export their GIL spans."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from otel_gil import config
from otel_gil.cli.base import Command, positive_float, require_root
from otel_gil.probes import ProbeConfig

SIDECAR_RINGBUF_PAGES = 1024


class SidecarCommand(Command):
    name = "sidecar"
    help = ("trace the Python processes that register on a Unix socket and export their "
            "GIL waits as spans (OTLP, per OTEL_EXPORTER_OTLP_*)")

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        opts = config.load()
        parser.add_argument("--listen", default=opts.socket,
                            help=f"Unix socket to accept registrations on (default {opts.socket}; "
                                 "'@name' for the abstract namespace)")
        parser.add_argument("--owner-fd", type=int, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--wait-threshold-ms", type=positive_float,
                            default=opts.wait_threshold_ms,
                            help="waits at least this long become gil.wait spans")
        parser.add_argument("--hold-threshold-ms", type=positive_float,
                            default=opts.hold_threshold_ms,
                            help="holds at least this long become gil.hold spans")
        parser.add_argument("--prometheus-port", type=int, default=opts.prometheus_port,
                            help=f"Prometheus metrics endpoint port (default "
                                 f"{opts.prometheus_port}; 0: none)")
        parser.add_argument("--max-thread-labels", type=int, default=opts.max_thread_labels,
                            help="distinct thread names per process in metric labels")
        parser.add_argument("--span-queue-mb", type=positive_float, default=opts.span_queue_mb,
                            help="memory bound of the span export queue, MiB (default "
                                 f"{opts.span_queue_mb:g}); spans beyond it are dropped "
                                 "and counted")

    def run(self, args: argparse.Namespace) -> int:
        require_root()
        from otel_gil.sidecar import Sidecar  # noqa: PLC0415 - imports bcc

        logging.getLogger("otel_gil").setLevel(logging.INFO)
        # A 4 MiB ring buffer: ~2 s of events at the 64-thread soak's rate, for a
        # sidecar that shares a busy machine's CPUs (kernel memory, not RssAnon).
        cfg = ProbeConfig(wait_threshold_ns=int(args.wait_threshold_ms * 1e6),
                          hold_threshold_ns=int(args.hold_threshold_ms * 1e6),
                          ringbuf_pages=SIDECAR_RINGBUF_PAGES)
        from otel_gil.metrics import default_readers  # noqa: PLC0415

        sidecar = Sidecar(cfg, listen=args.listen, owner_fd=args.owner_fd,
                          metric_readers=default_readers(args.prometheus_port),
                          max_thread_labels=args.max_thread_labels,
                          span_queue_bytes=int(args.span_queue_mb * (1 << 20)))
        if args.owner_fd is None:
            print(f"otel-gil: sidecar listening on {args.listen} (pid {os.getpid()})",
                  file=sys.stderr, flush=True)
        sidecar.serve()
        return 0
