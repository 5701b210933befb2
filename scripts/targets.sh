#!/usr/bin/env bash
# Build the non-pyenv CPython test targets of docs/shared test-targets.md, on
# Debian 12 as root, into ${OTEL_GIL_TARGETS:-/var/cache/otel-gil/targets}:
#   debian-3.11    the system /usr/bin/python3.11 with a python3.11-dbg whose
#                  build-id matches it (upgraded together when they differ);
#   py313t/        free-threaded CPython 3.13 built from trixie's python3.13
#                  source package (bin/python3.13t);
#   sid-3.14/      a root tree unpacked from sid's python3.14 binary packages,
#                  run with `chroot` (it needs sid's libc);
#   stripped-3.11/ the pyenv 3.11.7 prefix with libpython `strip --strip-all`ed.
# Each step writes TARGETS/<name>.stamp (recipe and input versions) and is
# skipped while the stamp matches and the result still checks out, so a second
# run takes seconds. Downloads come only from Debian's archive, through apt,
# with trixie/sid lists kept in a private directory (the system's bookworm
# sources are never touched).
set -Eeuo pipefail

TARGETS=${OTEL_GIL_TARGETS:-/var/cache/otel-gil/targets}
PYENV_311=${OTEL_GIL_PYENV_311:-/root/.pyenv/versions/3.11.7}
# Bump a recipe string to force a rebuild of that target on every machine.
RECIPE_PY313T="py313t-1 configure --disable-gil --enable-shared --without-ensurepip"
RECIPE_SID="sid-3.14-1"
RECIPE_STRIPPED="stripped-3.11-1 strip --strip-all"
# What python3.14 needs to start and to import threading, hashlib (OpenSSL),
# ctypes and decimal; libgcc-s1 because glibc dlopens it for pthread_exit.
SID_PACKAGES=(python3.14-minimal libpython3.14-minimal libpython3.14-stdlib python3.14-dbg
    libc6 zlib1g libexpat1 libzstd1 libssl3t64 libffi8 libmpdec4 libgcc-s1 libbz2-1.0 liblzma5
    media-types tzdata)
BUILD_DEPS=(build-essential pkg-config xz-utils libffi-dev zlib1g-dev libssl-dev libbz2-dev
    liblzma-dev libsqlite3-dev libreadline-dev libncurses-dev uuid-dev)

log() { printf 'targets: %s\n' "$*" >&2; }
die() { printf 'targets: ERROR: %s\n' "$*" >&2; exit 1; }
step_start() { STEP=$1; STEP_T0=$SECONDS; log "$STEP: $2"; }
step_done() { log "$STEP: done in $((SECONDS - STEP_T0)) s"; }
trap 'die "${STEP:-setup}: failed at line $LINENO (see messages above)"' ERR

[ "$(id -u)" = 0 ] || die "run as root (apt-get, chroot and unshare need it)"
[ -r /etc/debian_version ] || die "needs Debian 12 (apt, dpkg)"
mkdir -p "$TARGETS"

build_id() { readelf -n "$1" | awk '/Build ID:/ {print $3; exit}'; }
debug_file_for() { local id; id=$(build_id "$2"); echo "$1/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"; }
# grep reads all of readelf's output: `grep -q` could SIGPIPE readelf under pipefail.
no_symtab() { ! readelf -S "$1" | grep -F '.symtab' >/dev/null; }
stamp_is() { [ -f "$TARGETS/$1.stamp" ] && [ "$(cat "$TARGETS/$1.stamp")" = "$2" ]; }
missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

# --- private apt setup for trixie (sources) and sid (binaries) ---------------
APTDIR=$TARGETS/apt
APT_UPDATED=""
apt_private() {
    apt-get -q -o Dir::Etc::sourcelist="$APTDIR/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache" \
        -o APT::Sandbox::User=root "$@"
}
apt_private_update() {
    [ -z "$APT_UPDATED" ] || return 0
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
    local mirror
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    cat > "$APTDIR/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main
EOF
    log "updating private trixie/sid package lists in $APTDIR"
    apt_private update >/dev/null || die "apt-get update of the private trixie/sid lists failed"
    APT_UPDATED=1
}

# --- debian-3.11 --------------------------------------------------------------
step_debian_311() {
    local id dbg
    if [ -x /usr/bin/python3.11 ] && [ -z "$(missing_pkgs python3.11 python3.11-dbg)" ]; then
        dbg=$(debug_file_for "" /usr/bin/python3.11)
        if [ -f "$dbg" ]; then
            log "debian-3.11: up to date (build-id $(build_id /usr/bin/python3.11))"
            write_debian_stamp "$dbg"
            return
        fi
    fi
    step_start debian-3.11 "installing/upgrading python3.11 and python3.11-dbg together"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3.11 python3.11-dbg python3.11-minimal libpython3.11-minimal \
        libpython3.11-stdlib libpython3.11-dbg >/dev/null
    dbg=$(debug_file_for "" /usr/bin/python3.11)
    [ -f "$dbg" ] || die "debian-3.11: no $dbg after upgrade: python3.11-dbg does not match /usr/bin/python3.11"
    write_debian_stamp "$dbg"
    step_done
}
write_debian_stamp() {
    printf 'python3.11=%s python3.11-dbg=%s build-id=%s debug=%s\n' \
        "$(dpkg-query -W -f='${Version}' python3.11)" "$(dpkg-query -W -f='${Version}' python3.11-dbg)" \
        "$(build_id /usr/bin/python3.11)" "$1" > "$TARGETS/debian-3.11.stamp"
}

# --- py313t -------------------------------------------------------------------
step_py313t() {
    local prefix=$TARGETS/py313t src=$TARGETS/downloads/trixie-python3.13 build=$TARGETS/build/py313t
    local bin=$prefix/bin/python3.13t
    if [ -f "$TARGETS/py313t.stamp" ] && head -n 1 "$TARGETS/py313t.stamp" | grep -qxF "$RECIPE_PY313T" \
        && [ "$(PYTHON_GIL=0 "$bin" -c 'import sys; print(sys._is_gil_enabled())' 2>/dev/null)" = False ]; then
        log "py313t: up to date ($(tail -n 1 "$TARGETS/py313t.stamp"))"
        return
    fi
    step_start py313t "building free-threaded CPython 3.13 from trixie's python3.13 sources"
    local missing
    missing=$(missing_pkgs "${BUILD_DEPS[@]}")
    if [ -n "$missing" ]; then
        log "py313t: installing build dependencies: $(echo $missing)"
        apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
    fi
    mkdir -p "$src"
    if ! ls "$src"/python3.13_*.orig.tar.* >/dev/null 2>&1; then
        apt_private_update
        (cd "$src" && apt_private source --download-only python3.13 >/dev/null) \
            || die "py313t: apt-get source python3.13 (trixie) failed"
    fi
    local orig dsc
    orig=$(ls "$src"/python3.13_*.orig.tar.* | grep -v '\.asc$' | sort -V | tail -n 1)
    dsc=$(ls "$src"/python3.13_*.dsc | sort -V | tail -n 1)
    # The upstream tarball is built as is: Debian's patches target its own
    # multiarch packaging, and the free-threaded build is what we test here.
    rm -rf "$build" "$prefix"
    mkdir -p "$build"
    tar -xf "$orig" -C "$build" --strip-components=1
    log "py313t: configure + make -j$(nproc) + make install (about 5 minutes on 2 busy cores)"
    (cd "$build" \
        && ./configure -q --disable-gil --enable-shared --prefix="$prefix" --without-ensurepip \
            LDFLAGS="-Wl,-rpath,$prefix/lib" > "$TARGETS/py313t.build.log" 2>&1 \
        && make -j"$(nproc)" >> "$TARGETS/py313t.build.log" 2>&1 \
        && make install >> "$TARGETS/py313t.build.log" 2>&1) \
        || die "py313t: build failed, see $TARGETS/py313t.build.log"
    [ "$(PYTHON_GIL=0 "$bin" -c 'import sys; print(sys._is_gil_enabled())')" = False ] \
        || die "py313t: $bin does not run free-threaded"
    [ "$(PYTHON_GIL=1 "$bin" -c 'import sys; print(sys._is_gil_enabled())')" = True ] \
        || die "py313t: PYTHON_GIL=1 does not re-enable the GIL"
    rm -rf "$TARGETS/build"
    printf '%s\nsource=%s\n' "$RECIPE_PY313T" "$(basename "$dsc" .dsc)" > "$TARGETS/py313t.stamp"
    step_done
}

# --- sid-3.14 -----------------------------------------------------------------
sid_check() {
    local root=$1
    chroot "$root" /usr/bin/python3.14 -c \
        'import sys, threading, hashlib; hashlib.sha256(b""); print(sys.version)' >/dev/null 2>&1 \
        && [ -f "$(debug_file_for "$root" "$root/usr/bin/python3.14")" ]
}
step_sid_314() {
    local root=$TARGETS/sid-3.14 debs=$TARGETS/downloads/sid-debs
    if [ -f "$TARGETS/sid-3.14.stamp" ] && head -n 1 "$TARGETS/sid-3.14.stamp" | grep -qxF "$RECIPE_SID" \
        && sid_check "$root"; then
        log "sid-3.14: up to date ($(sed -n 2p "$TARGETS/sid-3.14.stamp"))"
        return
    fi
    step_start sid-3.14 "unpacking sid's python3.14 packages into a chroot tree"
    apt_private_update
    rm -rf "$debs" "$root"
    mkdir -p "$debs" "$root"
    (cd "$debs" && apt_private download "${SID_PACKAGES[@]}" >/dev/null) \
        || die "sid-3.14: apt-get download from sid failed"
    local f
    for f in "$debs"/*.deb; do dpkg -x "$f" "$root"; done
    # sid is merged-usr, and base-files (which makes these) is not unpacked.
    ln -sfn usr/lib "$root/lib"
    ln -sfn usr/lib64 "$root/lib64"
    ln -sfn usr/bin "$root/bin"
    ln -sfn usr/sbin "$root/sbin"
    mkdir -p "$root/proc" "$root/tmp" "$root/dev"
    chmod 1777 "$root/tmp"
    local id dbg
    id=$(build_id "$root/usr/bin/python3.14")
    dbg=$(debug_file_for "$root" "$root/usr/bin/python3.14")
    [ -f "$dbg" ] || die "sid-3.14: python3.14-dbg has no $dbg: its build-id does not match python3.14 ($id)"
    sid_check "$root" || die "sid-3.14: chroot $root /usr/bin/python3.14 does not run"
    local versions
    versions=$(for f in "$debs"/*.deb; do dpkg-deb -W --showformat='${Package}=${Version} ' "$f"; done)
    printf '%s\nbuild-id=%s\n%s\n' "$RECIPE_SID" "$id" "$versions" > "$TARGETS/sid-3.14.stamp"
    step_done
}

# --- stripped-3.11 ------------------------------------------------------------
step_stripped_311() {
    local dst=$TARGETS/stripped-3.11 lib=lib/libpython3.11.so.1.0
    local want="$RECIPE_STRIPPED from=$PYENV_311 source-build-id=$(build_id "$PYENV_311/$lib" 2>/dev/null || true)"
    [ -x "$PYENV_311/bin/python3.11" ] || die "stripped-3.11: no pyenv 3.11 at $PYENV_311"
    if stamp_is stripped-3.11 "$want" && no_symtab "$dst/$lib" \
        && LD_LIBRARY_PATH=$dst/lib "$dst/bin/python3.11" -c 'import threading' 2>/dev/null; then
        log "stripped-3.11: up to date"
        return
    fi
    step_start stripped-3.11 "copying $PYENV_311 and stripping its libpython"
    rm -rf "$dst"
    mkdir -p "$dst/bin" "$dst/lib"
    cp -a "$PYENV_311/bin/python3.11" "$dst/bin/"
    cp -a "$PYENV_311/$lib" "$dst/lib/"
    # The standard library only: site-packages (hundreds of MB here) and the
    # test suite play no part in what this target exercises.
    tar -C "$PYENV_311/lib" --exclude=python3.11/site-packages --exclude=python3.11/test \
        -cf - python3.11 | tar -C "$dst/lib" -xf -
    mkdir -p "$dst/lib/python3.11/site-packages"
    strip --strip-all "$dst/$lib"
    no_symtab "$dst/$lib" || die "stripped-3.11: .symtab still present"
    LD_LIBRARY_PATH=$dst/lib "$dst/bin/python3.11" -c 'import threading, hashlib' \
        || die "stripped-3.11: the stripped copy does not run"
    echo "$want" > "$TARGETS/stripped-3.11.stamp"
    step_done
}

T0=$SECONDS
step_debian_311
step_py313t
step_sid_314
step_stripped_311
log "all targets ready in $TARGETS ($((SECONDS - T0)) s)"
