#!/usr/bin/env bash
# Build the non-pyenv CPython test targets of docs/shared test-targets.md, on
# Debian 12 as root, into ${OTEL_GIL_TARGETS:-/var/cache/otel-gil/targets}:
#   debian-3.11    the system /usr/bin/python3.11 with a python3.11-dbg whose
#                  build-id matches it (upgraded together when they differ);
#   py313t/        free-threaded CPython 3.13 built from trixie's python3.13
#                  source package (bin/python3.13t);
#   py314t/, py315t/  the same from sid's python3.14 / python3.15 sources,
#                  when the archive serves them (else TARGETS/<name>.unavailable);
#   sid-3.14/, sid-3.15/  root trees unpacked from sid's python3.X binary
#                  packages (+ -dbg), run with `chroot` (they need sid's libc);
#   stripped-3.11/ the pyenv 3.11.7 prefix with libpython `strip --strip-all`ed;
#   stripped-3.15/ sid-3.15 without debug files, its executable stripped;
#   i386-3.11/     a 32-bit CPython (bookworm i386), which otel-gil refuses.
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
RECIPE_PY314T="py314t-1 configure --disable-gil --enable-shared --without-ensurepip"
RECIPE_PY315T="py315t-1 configure --disable-gil --enable-shared --without-ensurepip"
RECIPE_SID="sid-3.14-1"
RECIPE_SID_315="sid-3.15-1"
RECIPE_STRIPPED="stripped-3.11-1 strip --strip-all"
RECIPE_STRIPPED_315="stripped-3.15-1 strip --strip-all --remove-section=.gnu_debuglink, no usr/lib/debug"
RECIPE_I386="i386-3.11-1 bookworm python3.11-minimal:i386"
# Besides python3.X's own packages, what it needs to start and to import
# threading, hashlib (OpenSSL), ctypes and decimal; libgcc-s1 because glibc
# dlopens it for pthread_exit.
SID_LIBS=(libc6 zlib1g libexpat1 libzstd1 libssl3t64 libffi8 libmpdec4 libgcc-s1 libbz2-1.0 liblzma5
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

# --- private apt setup for trixie and sid (sources, sid binaries) ---------------
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
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main
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

# --- py313t, py314t, py315t ---------------------------------------------------
# Free-threaded CPython built from a Debian source package's upstream tarball:
# 3.13 from trixie, 3.14 and 3.15 from sid. When the archive has no such source
# (sid's python3.14/python3.15 source files answered 404 on 2026-12-01 although
# the Sources index lists them), the step says so, records why in
# TARGETS/<name>.unavailable (tests/targets.py skips those targets with that
# reason) and the other targets are built as usual.
step_freethreaded() {
    local version=$1 suite=$2 recipe=$3
    local name=py${version/./}t
    local prefix=$TARGETS/$name src=$TARGETS/downloads/$suite-python$version build=$TARGETS/build/$name
    local bin=$prefix/bin/python${version}t
    if [ -f "$TARGETS/$name.stamp" ] && head -n 1 "$TARGETS/$name.stamp" | grep -qxF "$recipe" \
        && [ "$(PYTHON_GIL=0 "$bin" -c 'import sys; print(sys._is_gil_enabled())' 2>/dev/null)" = False ]; then
        log "$name: up to date ($(tail -n 1 "$TARGETS/$name.stamp"))"
        return
    fi
    if [ -n "$(find "$TARGETS/$name.unavailable" -mtime -1 2>/dev/null)" ]; then
        log "$name: not built (tried less than a day ago): $(cat "$TARGETS/$name.unavailable")"
        return
    fi
    step_start "$name" "building free-threaded CPython $version from $suite's python$version sources"
    local missing
    missing=$(missing_pkgs "${BUILD_DEPS[@]}")
    if [ -n "$missing" ]; then
        log "$name: installing build dependencies: $(echo $missing)"
        apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
    fi
    mkdir -p "$src"
    if ! ls "$src"/python"$version"_*.orig.tar.* >/dev/null 2>&1; then
        apt_private_update
        local out
        if ! out=$(cd "$src" && apt_private source --download-only "python$version/$suite" 2>&1); then
            local why
            why=$(printf '%s\n' "$out" | grep -m 1 -E '^E: ' || echo "apt-get source failed")
            log "$name: WARNING: not built: apt-get source python$version ($suite): $why"
            printf 'apt-get source python%s (%s) failed on %s: %s\n' "$version" "$suite" \
                "$(date -u +%F)" "$why" > "$TARGETS/$name.unavailable"
            return
        fi
    fi
    rm -f "$TARGETS/$name.unavailable"
    local orig dsc
    orig=$(ls "$src"/python"$version"_*.orig.tar.* | grep -v '\.asc$' | sort -V | tail -n 1)
    dsc=$(ls "$src"/python"$version"_*.dsc | sort -V | tail -n 1)
    # The upstream tarball is built as is: Debian's patches target its own
    # multiarch packaging, and the free-threaded build is what we test here.
    rm -rf "$build" "$prefix"
    mkdir -p "$build"
    tar -xf "$orig" -C "$build" --strip-components=1
    log "$name: configure + make -j$(nproc) + make install (about 5 minutes on 2 busy cores)"
    (cd "$build" \
        && ./configure -q --disable-gil --enable-shared --prefix="$prefix" --without-ensurepip \
            LDFLAGS="-Wl,-rpath,$prefix/lib" > "$TARGETS/$name.build.log" 2>&1 \
        && make -j"$(nproc)" >> "$TARGETS/$name.build.log" 2>&1 \
        && make install >> "$TARGETS/$name.build.log" 2>&1) \
        || die "$name: build failed, see $TARGETS/$name.build.log"
    [ "$(PYTHON_GIL=0 "$bin" -c 'import sys; print(sys._is_gil_enabled())')" = False ] \
        || die "$name: $bin does not run free-threaded"
    [ "$(PYTHON_GIL=1 "$bin" -c 'import sys; print(sys._is_gil_enabled())')" = True ] \
        || die "$name: PYTHON_GIL=1 does not re-enable the GIL"
    rm -rf "$build"
    printf '%s\nsource=%s\n' "$recipe" "$(basename "$dsc" .dsc)" > "$TARGETS/$name.stamp"
    step_done
}

# --- sid-3.14, sid-3.15 --------------------------------------------------------
# A root tree unpacked from sid's binary packages of python3.X (+ its -dbg),
# run with chroot (it needs sid's libc). sid_packages VERSION lists them.
sid_packages() {
    echo "python$1-minimal libpython$1-minimal libpython$1-stdlib python$1-dbg ${SID_LIBS[*]}"
}
sid_check() {
    local root=$1 version=$2
    chroot "$root" "/usr/bin/python$version" -c \
        'import sys, threading, hashlib; hashlib.sha256(b""); print(sys.version)' >/dev/null 2>&1 \
        && [ -f "$(debug_file_for "$root" "$root/usr/bin/python$version")" ]
}
make_root_tree() {
    local root=$1
    # sid is merged-usr, and base-files (which makes these) is not unpacked.
    ln -sfn usr/lib "$root/lib"
    ln -sfn usr/lib64 "$root/lib64"
    ln -sfn usr/bin "$root/bin"
    ln -sfn usr/sbin "$root/sbin"
    mkdir -p "$root/proc" "$root/tmp" "$root/dev"
    chmod 1777 "$root/tmp"
}
step_sid() {
    local version=$1 recipe=$2
    local name=sid-$version root=$TARGETS/sid-$version debs=$TARGETS/downloads/sid-$version-debs
    if [ -f "$TARGETS/$name.stamp" ] && head -n 1 "$TARGETS/$name.stamp" | grep -qxF "$recipe" \
        && sid_check "$root" "$version"; then
        log "$name: up to date ($(sed -n 2p "$TARGETS/$name.stamp"))"
        return
    fi
    step_start "$name" "unpacking sid's python$version packages into a chroot tree"
    apt_private_update
    rm -rf "$debs" "$root"
    mkdir -p "$debs" "$root"
    # shellcheck disable=SC2046
    (cd "$debs" && apt_private download $(sid_packages "$version") >/dev/null) \
        || die "$name: apt-get download from sid failed"
    local f
    for f in "$debs"/*.deb; do dpkg -x "$f" "$root"; done
    make_root_tree "$root"
    local id dbg
    id=$(build_id "$root/usr/bin/python$version")
    dbg=$(debug_file_for "$root" "$root/usr/bin/python$version")
    [ -f "$dbg" ] || die "$name: python$version-dbg has no $dbg: its build-id does not match python$version ($id)"
    sid_check "$root" "$version" || die "$name: chroot $root /usr/bin/python$version does not run"
    local versions
    versions=$(for f in "$debs"/*.deb; do dpkg-deb -W --showformat='${Package}=${Version} ' "$f"; done)
    printf '%s\nbuild-id=%s\n%s\n' "$recipe" "$id" "$versions" > "$TARGETS/$name.stamp"
    step_done
}

# --- stripped-3.15 ------------------------------------------------------------
# sid-3.15's tree without its debug files, the executable `strip --strip-all`ed
# (no .gnu_debuglink either): what a slim container image of 3.15 ships.
step_stripped_315() {
    local src=$TARGETS/sid-3.15 dst=$TARGETS/stripped-3.15 exe=usr/bin/python3.15
    local want="$RECIPE_STRIPPED_315 source-build-id=$(build_id "$src/$exe")"
    if stamp_is stripped-3.15 "$want" && no_symtab "$dst/$exe" && [ ! -e "$dst/usr/lib/debug" ] \
        && chroot "$dst" "/$exe" -c 'import threading' 2>/dev/null; then
        log "stripped-3.15: up to date"
        return
    fi
    step_start stripped-3.15 "copying sid-3.15 without debug files, stripping python3.15"
    rm -rf "$dst"
    # Hard links: the tree costs no space; strip writes a new file for the exe.
    cp -al "$src" "$dst"
    rm -rf "$dst/usr/lib/debug" "$dst/usr/share/doc"
    strip --strip-all --remove-section=.gnu_debuglink -o "$dst/$exe.stripped" "$dst/$exe"
    mv -f "$dst/$exe.stripped" "$dst/$exe"
    chmod 755 "$dst/$exe"
    no_symtab "$dst/$exe" || die "stripped-3.15: .symtab still present"
    chroot "$dst" "/$exe" -c 'import threading, hashlib' \
        || die "stripped-3.15: the stripped copy does not run"
    echo "$want" > "$TARGETS/stripped-3.15.stamp"
    step_done
}

# --- i386-3.11 ----------------------------------------------------------------
# A 32-bit CPython (bookworm's i386 python3.11-minimal) in a chroot tree, run
# through the kernel's IA-32 emulation: a target otel-gil must refuse clearly.
step_i386_311() {
    local root=$TARGETS/i386-3.11 debs=$TARGETS/downloads/i386-debs
    if stamp_is i386-3.11 "$RECIPE_I386" \
        && chroot "$root" /usr/bin/python3.11 -c 'import threading' 2>/dev/null; then
        log "i386-3.11: up to date"
        return
    fi
    if [ ! -e /proc/sys/abi/vsyscall32 ] && ! grep -qs 'CONFIG_IA32_EMULATION=y' "/boot/config-$(uname -r)"; then
        log "i386-3.11: skipped: this kernel cannot run 32-bit programs (no IA32 emulation)"
        return
    fi
    step_start i386-3.11 "unpacking bookworm's i386 python3.11-minimal into a chroot tree"
    mkdir -p "$APTDIR/i386/lists/partial"
    local mirror
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    echo "deb [arch=i386 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} bookworm main" \
        > "$APTDIR/i386/sources.list"
    local o=(-o Dir::Etc::sourcelist="$APTDIR/i386/sources.list" -o Dir::Etc::sourceparts=-
        -o Dir::State::Lists="$APTDIR/i386/lists" -o Dir::Cache="$APTDIR/cache"
        -o APT::Sandbox::User=root -o APT::Architectures::=i386 -o APT::Architecture=i386)
    apt-get -q "${o[@]}" update >/dev/null || die "i386-3.11: apt-get update (bookworm i386) failed"
    rm -rf "$debs" "$root"
    mkdir -p "$debs" "$root"
    (cd "$debs" && apt-get -q "${o[@]}" download python3.11-minimal:i386 libpython3.11-minimal:i386 \
        libc6:i386 zlib1g:i386 libexpat1:i386 >/dev/null) || die "i386-3.11: apt-get download failed"
    local f
    for f in "$debs"/*.deb; do dpkg -x "$f" "$root"; done
    mkdir -p "$root/proc" "$root/tmp" "$root/dev"
    chmod 1777 "$root/tmp"
    chroot "$root" /usr/bin/python3.11 -c 'import threading' || die "i386-3.11: it does not run"
    echo "$RECIPE_I386" > "$TARGETS/i386-3.11.stamp"
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
step_freethreaded 3.13 trixie "$RECIPE_PY313T"
step_freethreaded 3.14 sid "$RECIPE_PY314T"
step_freethreaded 3.15 sid "$RECIPE_PY315T"
step_sid 3.14 "$RECIPE_SID"
step_sid 3.15 "$RECIPE_SID_315"
step_stripped_311
step_stripped_315
step_i386_311
log "all targets ready in $TARGETS ($((SECONDS - T0)) s)"
