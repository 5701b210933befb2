"""Which ELF object holds a python program's interpreter, found as ld.so(8)
would (a launcher's DT_NEEDED libpython), and the file tree it lives in."""

from __future__ import annotations

import os
import re
from typing import Mapping

from otel_gil.errors import TargetError
from otel_gil.target.elf import ElfObject
from otel_gil.target.interpreter import open_elf

# ABI flags in the name: t free-threaded (3.13+), d debug, m pymalloc (up to 3.7).
LIBPYTHON_RE = re.compile(r"^libpython3\.\d+[tdm]*\.so")


MUSL_REMEDY = ("run the app on a glibc-based image (Debian, Ubuntu, Fedora, RHEL, "
               "python:*-slim), not Alpine")


# Alpine maps /lib/ld-musl-ARCH.so.1 (libc.musl-ARCH.so.1 links to it); Debian's
# musl package maps /usr/lib/ARCH-linux-musl/libc.so, its loader's target.
MUSL_RE = re.compile(r"(^|/)(ld-musl-[^/]*\.so\.1|libc\.musl-[^/]*\.so\.1)$|-linux-musl/libc\.so$")


# Where ld.so looks last (ld.so(8), Debian's multiarch layout first); the
# /etc/ld.so.cache is not read: a libpython outside these is found via RUNPATH.
_DEFAULT_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64",
                     "lib", "usr/lib", "usr/local/lib")


def filesystem_root(path: str) -> str:
    """The root of the file tree holding ``path``: the nearest ancestor with its
    own usr/lib (a chroot tree, a container's rootfs), else "/". Its
    usr/lib/debug is where the program's debug files are."""
    d = os.path.dirname(os.path.abspath(path))
    while d != "/":
        if os.path.isdir(os.path.join(d, "usr", "lib")):
            return d
        d = os.path.dirname(d)
    return "/"


def interpreter_object(path: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(the ELF object holding the interpreter, its filesystem root) for a python program.

    A launcher built with --enable-shared (pyenv's bin/python3.X) holds no
    interpreter: its DT_NEEDED libpython is found as ld.so(8) would, DT_RPATH
    (only without DT_RUNPATH), LD_LIBRARY_PATH from ``env``, DT_RUNPATH, then
    the default directories, all inside the program's root.
    """
    root = filesystem_root(path)
    with open_elf(path) as obj:
        needed, rpath, runpath = _dynamic_tags(obj)
        loader = obj.program_interpreter()
    musl = next((n for n in [loader or "", *needed] if MUSL_RE.search(n)), None)
    if musl is not None:
        raise TargetError(f"{path} is linked against musl libc ({musl}): otel-gil supports "
                          "glibc only", remedy=MUSL_REMEDY)
    lib = next((n for n in needed if LIBPYTHON_RE.match(n)), None)
    if lib is None:
        return path, root  # the interpreter is linked in (Debian's /usr/bin/python3.X)
    env_path = (env or {}).get("LD_LIBRARY_PATH", "")
    dirs = ([] if runpath else rpath) + env_path.split(":") + runpath + list(_DEFAULT_LIB_DIRS)
    origin = os.path.dirname(os.path.abspath(path))
    searched = []
    for d in filter(None, dirs):
        if "$ORIGIN" in d or "${ORIGIN}" in d:
            host_dir = d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
        else:
            host_dir = os.path.join(root, d.lstrip("/"))
        searched.append(host_dir)
        if os.path.isfile(os.path.join(host_dir, lib)):
            return os.path.join(host_dir, lib), root
    raise TargetError(f"{path} needs {lib}, found in none of {', '.join(searched)}",
                      remedy="set LD_LIBRARY_PATH as the program runs with, or give its pid")


def _dynamic_tags(obj: ElfObject) -> tuple[list[str], list[str], list[str]]:
    """(DT_NEEDED names, DT_RPATH dirs, DT_RUNPATH dirs)."""
    needed: list[str] = []
    rpath: list[str] = []
    runpath: list[str] = []
    dynamic = obj.elf.get_section_by_name(".dynamic")
    for tag in dynamic.iter_tags() if dynamic is not None else ():  # type: ignore[attr-defined]
        kind = tag.entry.d_tag
        if kind == "DT_NEEDED":
            needed.append(tag.needed)
        elif kind == "DT_RPATH":
            rpath += tag.rpath.split(":")
        elif kind == "DT_RUNPATH":
            runpath += tag.runpath.split(":")
    return needed, rpath, runpath
