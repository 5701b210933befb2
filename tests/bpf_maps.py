"""The kernel's own state of a running sidecar, read from outside it: its BPF
`threads` and `targets` maps, duplicated from the sidecar's file descriptors with
pidfd_getfd(2) and read with the bpf(2) map calls (through libbcc's thin
wrappers). Nothing here goes through otel-gil's loader or Session, so tests can
check what the sidecar reports against what the probes really kept.
"""

from __future__ import annotations

import ctypes
import os
from typing import Dict, Type, TypeVar

from otel_gil.abi import events

SYS_PIDFD_GETFD = 438  # x86-64, Linux 5.6+
BPF_MAP_TYPE_HASH = 1  # include/uapi/linux/bpf.h

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T", bound=ctypes.Structure)


def _fdinfo(pid: int, fd: str) -> Dict[str, str]:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _steal(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd({pid}, {fd})")
        return int(got)
    finally:
        os.close(pidfd)


class SidecarMaps:
    """Copies of a sidecar's `threads` and `targets` map fds; close() them."""

    def __init__(self, sidecar_pid: int) -> None:
        self.fds: Dict[str, int] = {}
        wanted = {ctypes.sizeof(events.ThreadStats): "threads",
                  ctypes.sizeof(events.TargetState): "targets"}
        for fd in os.listdir(f"/proc/{sidecar_pid}/fd"):
            try:
                if os.readlink(f"/proc/{sidecar_pid}/fd/{fd}") != "anon_inode:bpf-map":
                    continue
                info = _fdinfo(sidecar_pid, fd)
            except OSError:
                continue
            name = wanted.get(int(info["value_size"]))
            if name and int(info["map_type"]) == BPF_MAP_TYPE_HASH and int(info["key_size"]) == 4:
                assert name not in self.fds, f"two {name} maps in pid {sidecar_pid}"
                self.fds[name] = _steal(sidecar_pid, int(fd))
        assert set(self.fds) == {"threads", "targets"}, self.fds

    def _entries(self, name: str, kind: Type[T]) -> Dict[int, T]:
        from bcc.libbcc import lib  # noqa: PLC0415 - only where BCC exists (root tests)

        fd, out = self.fds[name], {}
        key, nxt = ctypes.c_uint32(), ctypes.c_uint32()
        if lib.bpf_get_first_key(fd, ctypes.byref(key), ctypes.sizeof(key)) != 0:
            return {}
        while True:
            value = kind()
            if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0:
                out[key.value] = value
            if lib.bpf_get_next_key(fd, ctypes.byref(key), ctypes.byref(nxt)) != 0:
                return out
            key.value = nxt.value

    def threads(self, pid: int) -> Dict[int, events.ThreadStats]:
        """The kernel's per-thread entries of process pid, by tid."""
        return {tid: st for tid, st in self._entries("threads", events.ThreadStats).items()
                if st.pid == pid}

    def target(self, pid: int) -> events.TargetState:
        return self._entries("targets", events.TargetState)[pid]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
