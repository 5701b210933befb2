#!/bin/sh
# Entrypoint of the otel-gil sidecar image: make kernel headers visible to BCC, then
# run the command (by default `otel-gil sidecar`).
#
# BCC compiles its C program when the sidecar starts, against
# /lib/modules/$(uname -r)/{build,source}. The kernel release is the host's, which
# the image cannot know when it is built. When the host's headers are not mounted,
# link the image's Debian headers (linux-headers-amd64) under the host's release:
# uprobe programs read no kernel structs, so headers of another release are enough.
# Debian splits them in two trees: `build` (the -amd64 one, generated files) and
# `source` (the -common one, with include/linux/kconfig.h); BCC needs both.
set -eu
krel=$(uname -r)
mod=/lib/modules/$krel
if [ ! -e "$mod/build/include/linux/kconfig.h" ] && [ ! -e "$mod/source/include/linux/kconfig.h" ]; then
    build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    source=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$build" ] || [ -z "$source" ]; then
        echo "otel-gil: no kernel headers in the image or mounted at $mod" >&2
        exit 1
    fi
    mkdir -p "$mod"
    ln -sfn "$build" "$mod/build"
    ln -sfn "$source" "$mod/source"
    echo "otel-gil: no headers for kernel $krel mounted; using $build (enough for uprobes)" >&2
fi
exec "$@"
