"""Everything otel-gil reads from /proc about another process, in one place.

Identity (NSpid, start time, parent, comm), liveness (zombie, exiting), the
mappings and how to open a mapped file from here (/proc/PID/root), and memory
(/proc/PID/mem). Field numbers are proc(5)'s. What a traced process shows here
is its own to change (its thread names, its memory): callers treat it as
untrusted.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

from otel_gil.errors import TargetError, TargetGone
from otel_gil.trust import printable

ROOT_REMEDY = "run as root (reading another process's maps and memory needs CAP_SYS_PTRACE)"

# include/linux/sched.h: set by do_exit() (exit_signals()) before exit_mm() unmaps
# the process's memory, so a process still listed but past this point is going.
PF_EXITING = 0x00000004


# ------------------------------------------------------------------ files


def read(pid: int, name: str) -> str:
    """/proc/PID/<name> as text; TargetGone when there is no such process."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError) as err:
        raise TargetGone(f"no process with pid {pid}") from err
    except PermissionError as err:
        raise TargetError(f"cannot read /proc/{pid}/{name}", remedy=ROOT_REMEDY) from err


def status_field(status: str, key: str) -> str:
    """One "Key:" line's value in the text of a /proc/.../status file."""
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1]
    return ""


def _stat_fields(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat's fields after comm (comm may hold spaces and parentheses:
    they follow the last ')'), field 3 (state) first; None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


# ------------------------------------------------------------------ identity and liveness


def start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat, which tells a live target from a reused pid;
    None once the process is gone or a zombie (exited, not yet reaped)."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def exited(pid: int) -> bool:
    """Gone, or a zombie: it has exited (reaped or not)."""
    return start_time(pid) is None


def exiting(pid: int) -> bool:
    """True when pid is gone, a zombie, or its thread-group leader is exiting
    (state and flags, fields 3 and 9 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    try:
        return fields is None or fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)
    except (IndexError, ValueError):
        return True


def descends_from(pid: int, ancestor: int) -> bool:
    """Is `ancestor` pid's parent, grandparent, ...? (/proc/PID/stat's ppid chain.)"""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        fields = _stat_fields(pid)
        try:
            pid = int(fields[1]) if fields is not None else -1
        except (IndexError, ValueError):
            return False
        if pid < 0:
            return False
    return False


PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial PID namespace's inode (include/linux/proc_ns.h)


def own_pid_namespace() -> Optional[Tuple[int, int]]:
    """(st_dev, st_ino) of our PID namespace when it is not the initial one,
    e.g. a sidecar container sharing its pod's PID namespace; else None."""
    st = os.stat("/proc/self/ns/pid")
    return None if st.st_ino == PROC_PID_INIT_INO else (st.st_dev, st.st_ino)


def children(pid: int) -> List[int]:
    """pid's children, from /proc/PID/task/*/children (Linux 4.2+); [] when unreadable."""
    try:
        return [int(c) for tid in os.listdir(f"/proc/{pid}/task")
                for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def nspid_of(status: str) -> Tuple[int, ...]:
    """The NSpid line of a /proc/.../status text: the id in each PID namespace,
    outermost first (Linux 4.1+); () when absent."""
    try:
        return tuple(int(x) for x in status_field(status, "NSpid").split())
    except ValueError:
        return ()


def nspid(pid: int) -> Tuple[int, ...]:
    """pid in each PID namespace it is in, outermost first; (pid,) when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return nspid_of(f.read()) or (pid,)
    except OSError:
        return (pid,)


def _ns_tid(path: str) -> Optional[int]:
    """The innermost NSpid of a task's status file; None when unreadable."""
    try:
        with open(path) as f:
            found = nspid_of(f.read())
    except OSError:
        return None
    return found[-1] if found else None


def ns_tid_map(pid: int) -> Dict[int, int]:
    """tid in the target's own PID namespace -> our tid, for its live threads."""
    out: Dict[int, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        found = _ns_tid(f"/proc/{pid}/task/{task}/status")
        if found is not None:
            out[found] = int(task)
    return out


def task_tids(pid: int) -> FrozenSet[int]:
    """Our tids of the process's live threads (one directory read: no status files)."""
    try:
        return frozenset(int(task) for task in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return frozenset()


def thread_alive(pid: int, tid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/task/{tid}")


def thread_name(pid: int, tid: int) -> str:
    """The OS thread name, from /proc while the thread lives ("?" after)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", errors="replace") as f:
            return printable(f.read().strip()) or "?"  # the target names its threads: untrusted
    except OSError:
        return "?"


def thread_identity(pid: int, tid: int) -> Tuple[str, int]:
    """(OS thread name, tid in the target's namespace), from /proc while the thread lives."""
    ns_tid = _ns_tid(f"/proc/{pid}/task/{tid}/status")
    return thread_name(pid, tid), tid if ns_tid is None else ns_tid


# ------------------------------------------------------------------ mappings and paths


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    inode: int
    path: str


def maps(pid: int) -> List[Mapping]:
    """The file-backed mappings of /proc/PID/maps."""
    out = []
    for line in read(pid, "maps").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        lo, hi = parts[0].split("-")
        path = parts[5].replace(" (deleted)", "")
        out.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), int(parts[4]), path))
    return out


@dataclass(frozen=True)
class ExecMapping:
    """An executable file mapping (holder stacks: otel_gil/stacks/unwind.py)."""

    start: int
    end: int
    file_offset: int
    path: str


def executable_maps(pid: int) -> List[ExecMapping]:
    """The process's executable file mappings (/proc/PID/maps)."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines[:65536]:
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append(ExecMapping(lo, hi, int(parts[2], 16), parts[5].rstrip("\n")))
    return sorted(out, key=lambda m: m.start)


def exe_path(pid: int) -> str:
    """/proc/PID/exe's target, as the process sees it."""
    try:
        return os.readlink(f"/proc/{pid}/exe").replace(" (deleted)", "")
    except FileNotFoundError as err:
        raise TargetError(f"no process with pid {pid}") from err
    except PermissionError as err:
        raise TargetError(f"cannot read /proc/{pid}/exe", remedy=ROOT_REMEDY) from err


def open_path(pid: int, m: Mapping) -> str:
    """A path that opens the mapped file from here, checked by inode.

    Through /proc/PID/root for a container or chroot whose maps show paths as
    the target sees them; as printed, when the target is chrooted under a
    directory we can see (maps print paths relative to *our* root then); last,
    /proc/PID/map_files, which works across mount namespaces (root only).
    """
    candidates = (f"/proc/{pid}/root{m.path}", m.path,
                  f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}")
    for path in candidates:
        try:
            if os.stat(path).st_ino == m.inode:
                return path
        except OSError:
            continue
    raise TargetError(f"cannot open {m.path} of pid {pid}", remedy=ROOT_REMEDY)


def under_root(pid: int, path: str) -> str:
    """``path`` as /proc/PID/root/..., for a tool that must not resolve it itself.
    BCC rewrites a plain path to /proc/PID/root/<path>, which is wrong for a
    chrooted target whose /proc/PID/maps shows host paths (BCC then fails with
    "cannot attach uprobe"); a path already under /proc/PID is left alone."""
    if path.startswith("/proc/"):
        return path
    root = os.path.realpath(f"/proc/{pid}/root")
    inside = path[len(root):] if root != "/" and path.startswith(root + "/") else path
    return f"/proc/{pid}/root{inside}"


def outside_root(pid: int, path: str) -> str:
    """``path`` without its /proc/PID/root prefix when that root is ours (a path
    that still means something once the process is gone)."""
    prefix = f"/proc/{pid}/root"
    if path.startswith(prefix + "/") and os.path.realpath(prefix) == "/":
        return path[len(prefix):]
    return path


_ROOT_PREFIX = re.compile(r"^/proc/\d+/root(?=/)")


def shown(path: str) -> str:
    """A path for reports: /proc/PID/root/x is shown as x (the pid is gone later)."""
    return _ROOT_PREFIX.sub("", path)


# ------------------------------------------------------------------ memory


class Memory:
    """A process's memory through /proc/PID/mem, open for several reads.

    read() raises TargetError (one message for every way a read fails);
    peek() is for best-effort reads and returns b"" instead."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except PermissionError as err:
            raise TargetError(f"cannot read the memory of process {pid}: {err}",
                              "run as root, as the same user, or with CAP_SYS_PTRACE") from err
        except FileNotFoundError as err:
            raise TargetGone(f"no process with pid {pid}") from err
        except OSError as err:
            raise TargetError(f"cannot read the memory of process {pid}: {err}",
                              "check the pid and that the process is still running") from err

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, address: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, address)
        except (OSError, ValueError, OverflowError) as err:
            raise TargetError(
                f"cannot read {length} bytes at {address:#x} in process {self.pid}: {err}",
                "check the pid and that the process is still running") from err
        if len(data) != length:
            raise TargetError(f"short read at {address:#x} in process {self.pid}",
                              "the process may have exited or unmapped that memory")
        return data

    def pread(self, address: int, length: int) -> bytes:
        """The raw read: fewer bytes where the mapping ends, OSError where none can be read
        (an address no file offset can name, too: a pointer read from the target's
        memory is untrusted, and a torn one is often past 2**63)."""
        try:
            return os.pread(self._fd, length, address)
        except OverflowError as err:
            raise OSError(errno.EFAULT, f"no such address: {address:#x}") from err

    def peek(self, address: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, address)
        except (OSError, ValueError, OverflowError):
            return b""


def read_memory(pid: int, address: int, length: int) -> bytes:
    """One read of another process's memory (see Memory.read)."""
    with Memory(pid) as mem:
        return mem.read(address, length)


def peek_memory(pid: int, address: int, length: int) -> bytes:
    """Best effort: b"" (or fewer bytes) where the process or the memory is gone."""
    try:
        mem = Memory(pid)
    except TargetError:
        return b""
    with mem:
        return mem.peek(address, length)
