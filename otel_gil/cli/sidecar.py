"""`otel-gil sidecar`: trace the processes that register, export their GIL spans."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Optional

from otel_gil import config
from otel_gil.app.plan import OWNER_TOKEN
from otel_gil.cli.base import Command, positive_float, power_of_two, require_root
from otel_gil.cli.common import add_probe_set_option
from otel_gil.cli.stack_options import add_stack_threshold_option, stack_settings
from otel_gil.probes.config import ProbeConfig


class SidecarCommand(Command):
    name = "sidecar"
    help = ("trace the Python processes that register on a Unix socket and export their "
            "GIL waits as spans (OTLP, per OTEL_EXPORTER_OTLP_*)")

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        opts = config.load()
        parser.add_argument("--listen", default=opts.socket,
                            help=f"Unix socket to accept registrations on (default {opts.socket}; "
                                 "'@name' for the abstract namespace)")
        parser.add_argument("--socket-group", default=None,
                            help="only members of this group may register (socket mode 0660); "
                                 "default: any local process may register itself (mode 0666)")
        parser.add_argument("--owner-fd", type=int, default=None, help=argparse.SUPPRESS)
        # A spawned sidecar's listening socket, bound by its app (otel_gil.app.plan).
        parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--wait-threshold-ms", type=positive_float,
                            default=opts.wait_threshold_ms,
                            help="waits at least this long become gil.wait spans")
        parser.add_argument("--hold-threshold-ms", type=positive_float,
                            default=opts.hold_threshold_ms,
                            help="holds at least this long become gil.hold spans")
        add_stack_threshold_option(parser, opts.stack_threshold_ms)
        parser.add_argument("--prometheus-port", type=int, default=opts.prometheus_port,
                            help=f"Prometheus metrics endpoint port (default "
                                 f"{opts.prometheus_port}; 0: none)")
        parser.add_argument("--max-thread-labels", type=int, default=opts.max_thread_labels,
                            help="distinct thread names per process in metric labels")
        parser.add_argument("--ringbuf-pages", type=power_of_two, default=opts.ringbuf_pages,
                            help=f"event ring buffer size in pages (default "
                                 f"{opts.ringbuf_pages}); events that find it full are "
                                 "counted as lost")
        add_probe_set_option(parser, opts.probes)
        parser.add_argument("--span-queue-mb", type=positive_float, default=opts.span_queue_mb,
                            help="memory bound of the span export queue, MiB (default "
                                 f"{opts.span_queue_mb:g}); spans beyond it are dropped "
                                 "and counted")

    def run(self, args: argparse.Namespace) -> int:
        require_root()
        from otel_gil.sidecar.host import listen, settle_heap  # noqa: PLC0415
        from otel_gil.sidecar.server import Sidecar  # noqa: PLC0415 - imports bcc

        logging.getLogger("otel_gil").setLevel(logging.INFO)
        cfg = ProbeConfig.from_ms(args.wait_threshold_ms, args.hold_threshold_ms,
                                  ringbuf_pages=args.ringbuf_pages, probes=args.probes,
                                  **stack_settings(args.stack_threshold_ms))
        from otel_gil.export.readers import default_readers  # noqa: PLC0415

        # The socket first: a refusal (an untrusted directory) is one line and
        # exit 5, before anything else has started. A spawned sidecar's was bound
        # by its app, before any fork (otel_gil.app.plan).
        if args.listen_fd is not None:
            listener: Optional[socket.socket] = socket.socket(fileno=args.listen_fd)
        else:
            listener = listen(args.listen, args.socket_group) if args.listen else None
        sidecar = Sidecar(cfg, listener=listener, owner_fd=args.owner_fd,
                          metric_readers=lambda: default_readers(args.prometheus_port),
                          max_thread_labels=args.max_thread_labels,
                          owner_token=os.environ.pop(OWNER_TOKEN, None),
                          span_queue_bytes=int(args.span_queue_mb * (1 << 20)))
        if args.owner_fd is None:
            print(f"otel-gil: sidecar listening on {args.listen} (pid {os.getpid()})",
                  file=sys.stderr, flush=True)
        settle_heap()  # up and serving from now: the start-up's objects leave the GC's scans
        sidecar.serve()
        return 0
