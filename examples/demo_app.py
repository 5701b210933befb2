"""A threaded HTTP service whose light requests wait for the GIL behind heavy ones.

    python examples/demo_app.py [--host 127.0.0.1] [--port 8000]

    GET /cpu      pure-Python work, ~25 ms holding the GIL
    GET /light    a 2 ms sleep and a little work: it needs the GIL back after the
                  sleep, so it waits behind whichever /cpu request holds it
    GET /healthz  200 "ok"

Ordinary OpenTelemetry (one SERVER span per request, exported over OTLP per the
OTEL_EXPORTER_OTLP_* variables) plus one otel-gil line: `otel_gil.instrument()`.
The GIL waits then arrive as `gil.wait` children of the request spans.

Prints one JSON line once tracing is live (or known to be off):
{"ready": true, "pid": ..., "port": ..., "traced": true, "status": null}
SIGTERM or Ctrl-C: stop serving, flush the spans, exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import otel_gil

tracer = trace.get_tracer("gil-demo")


def cpu_work() -> int:
    # ~25 ms of bytecode. It gives the GIL up only when a waiting thread asks,
    # after the 5 ms switch interval (sys.getswitchinterval()).
    return sum(i * i for i in range(300_000))


def light_work() -> int:
    time.sleep(0.002)  # releases the GIL; getting it back is where the wait is
    return sum(range(1_000))


ROUTES = {"/cpu": cpu_work, "/light": light_work, "/healthz": lambda: "ok"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one handler thread per client connection

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        route = ROUTES.get(path)
        with tracer.start_as_current_span(
                f"GET {path}" if route else "GET", kind=trace.SpanKind.SERVER,
                context=propagate.extract(self.headers),  # a caller's traceparent, if any
                attributes={"http.request.method": "GET", "url.path": path}) as span:
            status, body = (200, str(route()).encode()) if route else (404, b"not found")
            span.set_attribute("http.response.status_code", status)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: the spans are the record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args()

    service = os.environ.get("OTEL_SERVICE_NAME", "gil-demo")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    otel_gil.instrument()  # the one otel-gil line; never raises
    traced = otel_gil.wait_until_live(30)
    print(json.dumps({"ready": True, "pid": os.getpid(), "port": server.server_address[1],
                      "traced": traced, "status": otel_gil.status()}), flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        provider.shutdown()  # flushes the spans not yet exported


if __name__ == "__main__":
    main()
