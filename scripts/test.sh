#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine (as root): set up
# (idempotent), build or reuse the cached test interpreters, then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/targets.sh
exec .venv/bin/python -m pytest -ra "$@"
