#!/usr/bin/env bash
# Set up otel-gil on a fresh Debian 12 machine (run as root), idempotently:
#   1. OS packages: BCC (python3-bpfcc), kernel headers, debug symbols for the
#      distro python3.11 (one of the test targets);
#   2. /lib/modules/$(uname -r)/build -> headers BCC can compile against;
#   3. .venv at the repository root with otel-gil installed (editable), and the
#      OS's `bcc` module made importable there (never PyPI's `bcc`, an unrelated
#      package).
# A second run changes nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf 'setup: %s\n' "$*" >&2; }

APT_PACKAGES=(python3-bpfcc python3-venv python3.11 python3.11-dbg binutils gcc)
KREL=$(uname -r)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
headers_pkg=""
if [ ! -e "/lib/modules/$KREL/build/include" ] || [ ! -e "/lib/modules/$KREL/source" ]; then
    # Prefer the exact headers; fall back to the distro's generic ones.
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
        headers_pkg="linux-headers-$KREL"
    else
        headers_pkg="linux-headers-amd64"
    fi
    dpkg-query -W -f='${Status}' "$headers_pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$headers_pkg")
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing OS packages: ${missing[*]}"
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        # The upgrade of python3.11 matters: python3.11-dbg's build-id must
        # match /usr/bin/python3.11 exactly.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if [ ! -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] && [ ! -e "/lib/modules/$KREL/source/include/linux/kconfig.h" ]; then
    # Debian splits headers in two: build -> linux-headers-V-amd64 (arch part),
    # source -> linux-headers-V-common. BCC reads both; link both, as Debian does.
    distro=$(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$distro" ] && [ -e "$distro/build" ] || { log "no kernel headers found under /lib/modules"; exit 1; }
    log "WARNING: no headers package for kernel $KREL; using $(basename "$distro")'s headers."
    log "         That is enough for uprobe programs (they read no kernel structs)."
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$(readlink -f "$distro/build")" "/lib/modules/$KREL/build"
    [ -e "$distro/source" ] && ln -sfn "$(readlink -f "$distro/source")" "/lib/modules/$KREL/source"
fi

# BCC attaches tracepoints through tracefs; fresh VMs may not mount it.
if [ ! -d /sys/kernel/tracing/events ]; then
    log "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing
fi

BASE_PYTHON=${OTEL_GIL_SETUP_PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $BASE_PYTHON"
    "$BASE_PYTHON" -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The OS's bcc is pure Python over libbcc.so: link just that package in.
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"

stamp=.venv/.otel-gil-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing otel-gil (editable) with its test dependencies (log: .venv/pip.log)"
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -e ".[test,bench]"; } > .venv/pip.log 2>&1; then
        tail -n 30 .venv/pip.log >&2
        log "pip install failed (full log: .venv/pip.log)"
        exit 1
    fi
    touch "$stamp"
fi
.venv/bin/python -c 'import bcc, otel_gil' || { log "bcc or otel_gil does not import in .venv"; exit 1; }
log "ready: .venv/bin/otel-gil"
