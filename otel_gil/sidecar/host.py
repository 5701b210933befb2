"""The sidecar process's own resources and rules: its registration socket, who
may register through it, its heap, and the pace of its loop (its CPU).

Memory: libbcc compiles the BPF program with clang/LLVM in this process and
frees ~30 MB afterwards that glibc keeps (trim_heap returns it), and every
thread that allocates gets its own malloc arena (limit_arenas caps them).
CPU: settle_heap takes the start-up's objects out of the cyclic GC's scans.
bench/README.md has the breakdown.
"""

from __future__ import annotations

import ctypes
import gc
import grp
import hmac
import os
import socket
import stat
from typing import Optional, Tuple

from otel_gil import trust
from otel_gil.app import protocol
from otel_gil.errors import EnvironmentProblem
from otel_gil.target import procfs

# The loop (otel_gil/sidecar/server.py, paced by Pace): a turn waits POLL_MS for
# events (the probes do not wake it, see Probes.poll: the wait is a timer), then
# exports spans for at most EXPORT_BUDGET_NS of CPU, so that the ring buffer is
# drained between exports. A turn that ran out of budget with spans due is
# followed at once, up to CATCH_UP_TURNS in a row: a POLL_MS wait per budget
# capped delivery at ~1100 spans/s (bench/README.md), and unbounded catching up
# would give a sidecar that cannot keep up a whole core and the GIL of its own
# loop. So the loop takes at most ~(1 + CATCH_UP_TURNS) budgets of export CPU per
# POLL_MS: about half a core, ~3000 spans/s here; beyond, the backlog reaches its
# bound and the excess is dropped, counted. MIN_TURN_S is a floor for a turn whose
# wait was cut short (a signal).
POLL_MS = 100
MIN_TURN_S = 0.02
EXPORT_BUDGET_NS = 20_000_000
CATCH_UP_TURNS = 4


class Pace:
    """How long each turn of the sidecar's loop waits for events."""

    def __init__(self) -> None:
        self.caught_up = 0  # turns in a row that followed a turn at once

    def after(self, behind: bool, turn_s: float) -> Tuple[int, float]:
        """After a turn that took turn_s, and stopped on its budget with spans due
        (behind) or not: the next turn's wait for events (ms), and the sleep
        before it (s)."""
        if behind and self.caught_up < CATCH_UP_TURNS:
            self.caught_up += 1
            return 0, 0.0
        self.caught_up = 0
        return POLL_MS, max(0.0, MIN_TURN_S - turn_s)


def refusal(reg: protocol.Registration, pid: int, owner_pid: Optional[int],
            owner_token: str) -> str:
    """Why process pid may not register (empty: it may). It may ask only for
    itself; a spawned sidecar (owner_pid, None for its owner itself) serves its
    app and what that app started: those that hold its token, or descend from it."""
    nspid = procfs.nspid(pid)
    if reg.pid is not None and reg.pid not in nspid:
        return (f"the connecting process is pid {nspid[-1]}, not {reg.pid}; a process may "
                "only ask for itself to be traced")
    if owner_pid is not None and not (
            owner_token and hmac.compare_digest(reg.token, owner_token)) \
            and not procfs.descends_from(pid, owner_pid):
        return f"this sidecar serves process {owner_pid} and its children only"
    return ""


M_ARENA_MAX = -8  # glibc malloc.h


def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no C library to ask
        return None


def limit_arenas(count: int = 2) -> None:
    """Cap glibc's malloc arenas: each thread that allocates (gRPC's, the
    exporters', Prometheus's) otherwise gets its own, which stays resident."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, count)


def trim_heap() -> None:
    """Give freed heap memory back to the kernel (glibc's malloc_trim; a no-op
    elsewhere). BCC's compile frees most of what LLVM allocated, but glibc keeps
    it mapped until asked."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# The cyclic GC's thresholds while the sidecar serves: (allocations before a
# young collection, young collections per middle one, middle per full). The
# defaults (700, 10, 10) made the GC ~7% of a core at ~7000 spans/s: intervals
# waiting to be exported survive young collections and were scanned again in
# each middle and full one (bench/README.md). A full collection still comes
# every 2 M allocations (~20 s at that rate): a cycle that reached the old
# generation (a logged exception's traceback) is not kept for long.
SERVING_GC_THRESHOLDS = (20_000, 10, 10)


def settle_heap() -> None:
    """Once the sidecar process is up (otel_gil/cli/sidecar.py): return the
    start-up's freed heap to the kernel, move every object alive now (BCC's,
    the SDK's, the modules') out of the GC's reach (gc.freeze: none of them is
    garbage, and a full collection scanned them all), and collect less often.
    The loop's objects are short-lived and nearly all acyclic: reference counting frees them."""
    trim_heap()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


def listen(path: str, group: Optional[str] = None) -> socket.socket:
    """Bind the registration socket. A path socket goes only into a directory that
    no other user can write (or pre-create): root creates a socket file there and
    makes it connectable by everyone, or by `group`; a file at the path is replaced
    only if it is a socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if path.startswith("@"):
        sock.bind(protocol.unix_address(path))
        sock.listen(64)
        return sock
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    why = trust.untrusted_reason(directory)
    if why is not None:
        sock.close()
        raise EnvironmentProblem(f"will not listen on {path}: {why}",
                                 "use a directory only root can write, such as /run/otel-gil")
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise EnvironmentProblem(f"no group {group!r}", "name an existing group") from None
    # The socket file gets its mode at bind time from the umask: no chmod of a
    # path that could have been swapped for a symlink meanwhile.
    old = os.umask(0o117 if group is not None else 0o111)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise EnvironmentProblem(f"cannot listen on {path}: {err.strerror or err}",
                                 "remove what is at that path, or choose another") from None
    finally:
        os.umask(old)
    if gid >= 0:
        os.chown(path, -1, gid, follow_symlinks=False)
    sock.listen(64)
    return sock
