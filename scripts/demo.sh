#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine (as root): set up, then run the demo:
# a threaded HTTP service (examples/demo_app.py, OpenTelemetry-instrumented, under
# otel_gil.instrument()) loaded with real HTTP requests for 10 s. It prints the
# slowest requests with their GIL waits and who held the GIL meanwhile, and writes
# out/demo.json and out/demo.html (timeline and flame graph: open it in a browser).
# With OTEL_EXPORTER_OTLP_ENDPOINT set, the spans go there instead.
# Extra arguments go to `otel-gil demo` (e.g. --duration 20).
#
# Tracing an arbitrary running process instead:
#   otel-gil record --pid PID --output out/record.json --html out/record.html
#   (try examples/contention.py)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/otel-gil demo "$@"
