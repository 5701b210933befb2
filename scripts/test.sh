#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine (as root): set up
# (idempotent), build or reuse the cached test interpreters, then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Test-only OS packages: bpftrace, as "another tracer" whose uprobe otel-gil must
# name; musl-tools, to build the musl-linked program otel-gil must refuse;
# prometheus, the real server that scrapes the demo's sidecar for every dashboard query.
TEST_PACKAGES=(bpftrace musl-tools prometheus)
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
# Test-only: Debian's chromium, the headless browser that opens the HTML view
# (tests/test_views_browser.py).
if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'install ok installed'; then
    echo "test: installing chromium" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
        >/dev/null 2>&1 || { apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
        >/dev/null; }
fi
# Test-only: speedscope's file-format JSON schema, shipped in its npm package;
# the --speedscope output is validated against it (tests/test_views.py).
SPEEDSCOPE_SCHEMA=/var/cache/otel-gil/speedscope-1.25.0/file-format-schema.json
if [ ! -s "$SPEEDSCOPE_SCHEMA" ]; then
    echo "test: fetching speedscope's file format schema (npm package speedscope@1.25.0)" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent speedscope@1.25.0 >/dev/null &&
        tar xzf speedscope-1.25.0.tgz package/dist/release/file-format-schema.json)
    mkdir -p "$(dirname "$SPEEDSCOPE_SCHEMA")"
    mv "$tmp/package/dist/release/file-format-schema.json" "$SPEEDSCOPE_SCHEMA"
    rm -rf "$tmp"
fi
bash scripts/targets.sh
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
