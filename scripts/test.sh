#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine (as root): set up
# (idempotent), build or reuse the cached test interpreters, then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test-only OS packages: bpftrace, as "another tracer" whose uprobe otel-gil must name;
# prometheus, the real server that scrapes the demo's sidecar for every dashboard query.
for pkg in bpftrace prometheus; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        echo "test: installing $pkg" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" \
            >/dev/null 2>&1 || { apt-get update -q >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" \
            >/dev/null; }
    fi
done
bash scripts/targets.sh
exec .venv/bin/python -m pytest -ra "$@"
