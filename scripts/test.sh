#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine (as root): set up
# (idempotent), build or reuse the cached test interpreters, then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test-only OS packages: bpftrace, as "another tracer" whose uprobe otel-gil must
# name; musl-tools, to build the musl-linked program otel-gil must refuse.
TEST_PACKAGES=(bpftrace musl-tools)
missing=()
for p in "${TEST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "test: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >/dev/null 2>&1 || { apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >/dev/null; }
fi
bash scripts/targets.sh
exec .venv/bin/python -m pytest -ra "$@"
