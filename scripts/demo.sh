#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine (as root): set up, then trace an
# example app whose threads contend for the GIL, print the per-thread table
# and write the full record to out/record.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
echo "demo: starting examples/contention.py (4 CPU-bound threads + 1 I/O thread, 5 s)" >&2
exec 3< <(.venv/bin/python examples/contention.py --seconds 5 --wait-for-go < <(sleep 2; echo go))
read -r ready <&3
pid=$(.venv/bin/python -c 'import json,sys; print(json.loads(sys.argv[1])["pid"])' "$ready")
echo "demo: tracing pid $pid with: otel-gil record --pid $pid --output out/record.json" >&2
.venv/bin/otel-gil record --pid "$pid" --output out/record.json
cat <&3 >/dev/null || true
