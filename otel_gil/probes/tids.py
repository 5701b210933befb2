"""Our tids of the threads the probes know by their tid in the target's PID
namespace (a holder read from its PyThreadState, when the target runs in
another PID namespace than ours: a container)."""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Iterable, Optional

from otel_gil.target import procfs


class HostTids:
    """ns tid -> our tid, per process, read from /proc as unknown ns tids come.

    A thread's ns tid is given to a new thread once it exits (PID numbers are
    reused after they wrap), so a mapping ends with its thread's holder entry:
    forget() takes out those the session reaped (Probes.forget_holders),
    and the next sighting of that ns tid reads /proc again. Not earlier, at
    its wait entry's reaping: its holder entry is still read after that, and
    an ns tid that /proc no longer knows would name a new thread (ci35: the
    contended set's hold totals counted twice).

    The ns tid comes from the target's memory, so any number may come, again
    and again: an unknown one costs a listing of the process's threads, and
    a read of each one's status file only when that listing changed since
    the last read (a thread came or went: else no status says more)."""

    def __init__(self, read_map: Callable[[int], Dict[int, int]] = procfs.ns_tid_map,
                 list_tasks: Callable[[int], FrozenSet[int]] = procfs.task_tids) -> None:
        self._read_map = read_map
        self._list_tasks = list_tasks
        self._known: Dict[int, Dict[int, int]] = {}
        self._listed: Dict[int, FrozenSet[int]] = {}  # pid -> its threads at the last read

    def translate(self, pid: int, ns_tid: int) -> int:
        """Our tid of the thread; ns_tid itself if /proc does not know it."""
        known = self._known.setdefault(pid, {})
        host = known.get(ns_tid)
        if host is not None:
            return host
        tasks = self._list_tasks(pid)
        if tasks != self._listed.get(pid):
            self._listed[pid] = tasks
            known.update(self._read_map(pid))
            host = known.get(ns_tid)
            if host is not None:
                return host
        return ns_tid

    def forget(self, pid: int, ns_tids: Optional[Iterable[int]] = None) -> None:
        """Threads of pid gone, by their ns tids; None: the whole process."""
        if ns_tids is None:
            self._known.pop(pid, None)
            self._listed.pop(pid, None)
            return
        known = self._known.get(pid, {})
        for ns_tid in ns_tids:
            known.pop(ns_tid, None)
            self._listed.pop(pid, None)  # a mapping gone: the next unknown one reads all again
