"""What a privileged otel-gil process may rely on in the filesystem.

A root sidecar must never import, execute or write through a path that another
user can write or pre-create (docs/security.md). `untrusted_reason()` answers
"could someone other than root or us have put this here?" for a path and every
directory above it. Stdlib only: the app side imports this too.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

# Who a privileged process trusts as the owner of a file it relies on.
_TRUSTED_UIDS = frozenset({0})


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in _TRUSTED_UIDS or st.st_uid == os.geteuid()


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def untrusted_reason(path: str) -> Optional[str]:
    """None if `path` and every directory leading to it are owned by root (or
    this process's user) and writable by no one else; else why not, in words.

    The real path is checked, so a symlink is as trusted as its target. A
    sticky directory such as /tmp may lie on the way: others can add entries
    there but not replace root's, and each entry below it is checked too (one
    another user created first is owned by them, so refused)."""
    real = os.path.realpath(path)
    current = real
    while True:
        try:
            st = os.lstat(current)
        except OSError as err:
            return f"{current}: {err.strerror or err}"
        if not _owner_ok(st):
            return f"{current} is owned by uid {st.st_uid}"
        if _writable_by_others(st) and not (stat.S_ISDIR(st.st_mode) and current != real
                                            and st.st_mode & stat.S_ISVTX):
            return f"{current} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def trusted_tree_reason(top: str) -> Optional[str]:
    """untrusted_reason() for a directory and everything below it (a package)."""
    why = untrusted_reason(top)
    if why is not None:
        return why
    for dirpath, dirnames, filenames in os.walk(os.path.realpath(top)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError as err:
                return f"{path}: {err.strerror or err}"
            if not _owner_ok(st):
                return f"{path} is owned by uid {st.st_uid}"
            if _writable_by_others(st) and not stat.S_ISLNK(st.st_mode):
                return f"{path} is writable by group or others"
            if stat.S_ISLNK(st.st_mode):
                why = untrusted_reason(path)
                if why is not None:
                    return why
    return None


def printable(name: str) -> str:
    """A name read from a traced process, safe to print to a terminal or a log:
    control characters (escape sequences, newlines) become '?'."""
    return "".join(c if c.isprintable() else "?" for c in name)


def printable_text(text: str) -> str:
    """printable() for a message of several lines, which keeps its newlines:
    for what is printed or logged whole (an error, a report) and may quote an
    untrusted name (a process's comm or paths, a span name)."""
    return "\n".join(printable(line) for line in text.split("\n"))


# Debian's python3-bpfcc: pure Python over libbcc.so, usable from any Python 3.
OS_BCC = "/usr/lib/python3/dist-packages/bcc"


def import_os_bcc(os_bcc: str = OS_BCC) -> Optional[str]:
    """Make `import bcc` work in a sidecar whose interpreter lacks it, by loading
    the OS's package from its own directory (never by putting a directory on
    sys.path: all of dist-packages could shadow the app's packages, and a
    directory made for the purpose could be pre-created by another user).
    Returns None when bcc is importable afterwards, else why not."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if "bcc" in sys.modules or importlib.util.find_spec("bcc") is not None:
        return None
    init = os.path.join(os_bcc, "__init__.py")
    if not os.path.isfile(init):
        return f"no bcc module here and no {init} (install python3-bpfcc)"
    why = trusted_tree_reason(os_bcc)
    if why is not None:
        return f"not loading {os_bcc}: {why}"
    spec = importlib.util.spec_from_file_location("bcc", init, submodule_search_locations=[os_bcc])
    if spec is None or spec.loader is None:
        return f"cannot load {init}"
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - reported as one line by the caller
        del sys.modules["bcc"]
        return f"importing {os_bcc} failed: {type(exc).__name__}: {exc}"
    return None
