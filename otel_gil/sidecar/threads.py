"""Who a traced thread is, for spans and metrics alike (runs in the sidecar).

A thread has one identity: its host tid, its tid in the app's PID namespace, its
name, and its Python ident when the app published one. The app's context table
(otel_gil/abi/slots.py) gives the ident and the Python thread name; else the
name is the OS one (/proc, as the session first read it, so that a thread that
exited keeps it). One ThreadDirectory per traced process holds them, with one
cache: the table is read at most once per NAMES_TTL_NS, and a thread not (yet)
found there is looked up again after RETRY_NS (threads publish their name at
their first span), not on every span.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from otel_gil.abi.slots import (
    HEADER_SIZE,
    SLOT_SIZE,
    InvalidTable,
    SlotRecord,
    TableLocation,
    header_slots,
    parse_counters,
    parse_slots,
)
from otel_gil.errors import OtelGilError
from otel_gil.target.procfs import read_memory, thread_alive, thread_identity

log = logging.getLogger("otel_gil.sidecar")

NAMES_TTL_NS = 50_000_000
RETRY_NS = 50_000_000
MAX_THREADS = 4096  # identities kept per process, the oldest looked up dropped first

# host tid -> (OS name, tid in the app's namespace), None when nothing is known
OsIdentity = Callable[[int], Optional[Tuple[str, int]]]
Published = Dict[int, Tuple[int, str]]  # ns tid -> (Python ident, thread name)


def read_slots(pid: int, table_address: int, max_slots: int = 1 << 16) -> List[SlotRecord]:
    """The occupied slots of process pid's table, read via /proc/PID/mem. The table
    is the traced process's to write, so untrusted: a header claiming more than
    max_slots (the size it registered) is refused, and the slots may change while
    read (a torn slot only mislabels that process's own threads)."""
    slots = header_slots(read_memory(pid, table_address, HEADER_SIZE), max_slots)
    return parse_slots(read_memory(pid, table_address, HEADER_SIZE + slots * SLOT_SIZE))


def read_counters(pid: int, table_address: int) -> Tuple[int, int]:
    """The app's (unplaced, errors) counters from its table's header. Untrusted
    numbers: they only ever feed that app's own metrics."""
    return parse_counters(read_memory(pid, table_address, HEADER_SIZE))


def read_thread_names(pid: int, table_address: int, max_slots: int = 1 << 16) -> Published:
    """native tid (in the app's PID namespace) -> (Python ident, thread name)."""
    return {r.tid: (r.ident, r.thread_name) for r in read_slots(pid, table_address, max_slots)}


@dataclass(frozen=True)
class ThreadInfo:
    host_tid: int
    ns_tid: int
    name: str
    ident: Optional[int] = None  # Python thread ident, when the app published it


class ThreadDirectory:
    """Thread identities of one traced process (see the module docstring)."""

    def __init__(self, pid: int, table: Optional[TableLocation], os_identity: OsIdentity) -> None:
        self.pid = pid
        self.table = table
        self._os_identity = os_identity
        self._threads: Dict[int, Tuple[ThreadInfo, int]] = {}  # host tid -> (info, when)
        self._published: Optional[Tuple[int, Published]] = None  # (when read, names)
        self._warned = False

    def names(self, host_tids: List[int]) -> List[str]:
        """Their names; the same as [self(t).name ...], a call less per thread
        found for good (this runs for every holder of every wait)."""
        out = []
        for tid in host_tids:
            hit = self._threads.get(tid)
            out.append(hit[0].name if hit is not None and hit[0].ident is not None
                       else self(tid).name)
        return out

    def name(self, host_tid: int) -> str:
        return self(host_tid).name

    def __call__(self, host_tid: int, published: bool = False) -> ThreadInfo:
        """published: the thread is known to have a slot (its span came from it),
        so a cached miss is stale: look again now."""
        hit = self._threads.get(host_tid)
        if hit is not None and hit[0].ident is not None:  # the hot path: found for good
            return hit[0]
        now = time.monotonic_ns()
        if hit is not None and not published and now - hit[1] < RETRY_NS:
            return hit[0]
        info = self._lookup(host_tid, published)
        if hit is not None and info.name == "?" and info.ident is None:
            info = hit[0]  # the thread has exited since: what was known of it stands
        self._threads.pop(host_tid, None)  # (re)inserted last: the oldest go first
        self._threads[host_tid] = (info, now)
        if len(self._threads) > MAX_THREADS:  # a thread-per-request server's dead threads
            del self._threads[next(iter(self._threads))]
        return info

    def remember(self, host_tid: int) -> None:
        """Look a thread up now, while it lives, if it is new: its interval is
        exported a little later (sidecar/server.py), when it may have exited,
        and then neither the kernel's map nor /proc knows it any more."""
        if host_tid not in self._threads:
            self(host_tid)

    def _lookup(self, tid: int, published: bool) -> ThreadInfo:
        """Its Python ident and name from the app's table, else its OS name."""
        known = self._os_identity(tid)  # read on its own if new since the last refresh
        if known is None and thread_alive(self.pid, tid):
            # not in the kernel's thread map (yet): /proc says, in the app's
            # PID namespace too, where its tid is not ours
            known = thread_identity(self.pid, tid)
        name, ns_tid = known if known is not None else ("?", tid)
        ident = None
        if self.table is not None:
            names = self._read_published()
            if published and ns_tid not in names:
                names = self._read_published(fresh=True)
            if ns_tid in names:
                ident, py_name = names[ns_tid]
                name = py_name or name
        return ThreadInfo(tid, ns_tid, name, ident)

    def _read_published(self, fresh: bool = False) -> Published:
        """The app's table, read at most once per NAMES_TTL_NS."""
        assert self.table is not None
        now = time.monotonic_ns()
        cached = self._published
        if fresh or cached is None or now - cached[0] > NAMES_TTL_NS:
            try:
                names = read_thread_names(self.pid, self.table.address, self.table.slots)
            except InvalidTable as err:
                names = {}
                # The app's memory is untrusted: say so, once.
                if not self._warned:
                    self._warned = True
                    log.warning("otel-gil: pid %s: its context table is invalid (%s); its spans "
                                "carry OS thread names", self.pid, err.args[0])
            except (OSError, ValueError, OtelGilError):
                names = {}  # unreadable: the process is exiting, or has unmapped it
            cached = (now, names)
            self._published = cached
        return cached[1]
