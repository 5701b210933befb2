"""A tracing session: the probes, the targets they watch, and per-thread totals.

`otel-gil record`, `top` and the sidecar all drive one Session: add targets,
call step() in a loop, read threads()/intervals. The session turns the kernel's
per-thread entries into ThreadTotals that outlive the threads (the kernel entry
of an exited thread is read one last time, then deleted).

What each number means depends on the probe set (ProbeConfig.probes):

- both sets: waits (a take_gil call that waited on gil->cond, from its first
  timed wait until a wake-up found the GIL free), forced switches (holds
  asked to drop), and hand-offs (the state's ``handoffs``: with the all set
  counted at each acquisition, with the contended set CPython's own
  gil->switch_number read from the process, both exact);
- all only: every acquisition, hold and release;
- contended: acquisitions are the waits that ended, and a thread's hold time
  is the time it held the GIL while another thread waited (reconstructed from
  the waiters' wake-ups: ``holds_scope``).

The kernel's entries are copied (one batched map read) only when something
needs them: every refresh_interval_s (exited threads must be reaped before the
map fills), when step(refresh=True) asks (the sidecar, before a metrics
collection), at detach and close; a thread first seen in an event is looked up
on its own (thread()). Without an on_interval callback the session keeps the
first max_intervals intervals and counts the rest in intervals_dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

from otel_gil.abi import events
from otel_gil.abi.slots import TableLocation
from otel_gil.errors import ProbeError, TargetGone
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.loader import Probes
from otel_gil.probes.totals import ThreadTotals
from otel_gil.target import process, procfs
from otel_gil.target.process import Target

log = logging.getLogger("otel_gil.session")


DEFAULT_MAX_INTERVALS = 20_000
EXIT_CHECK_NS = 250_000_000  # how often step() looks for targets that exited


@dataclass
class TargetInfo:
    target: Target
    started_ns: int  # CLOCK_MONOTONIC when it was added (and its probes attached)
    ended_ns: int = 0
    state: Optional[events.TargetState] = None  # last read of the kernel's per-process state
    ctx_table: Optional[TableLocation] = None
    # A free-threaded target added with its GIL off has no probes until the GIL
    # is switched on for good (Session._watch_gil); attached_ns is when they were.
    attached_ns: int = 0
    gil_enabled_ns: int = 0  # when the GIL was seen switched on after add(); 0 if never
    watched_ns: int = 0  # last read of _gil_runtime_state.enabled
    switch_start: Optional[int] = None  # gil->switch_number once the probes were attached
    switch_now: Optional[int] = None  # ... at the last refresh


@dataclass(frozen=True)
class Snapshot:
    """What the metrics stage is handed after a refresh: the per-thread totals,
    each target's kernel state (copies: the metric readers' threads read them
    while the session goes on), and the losses tied to no one process."""

    threads: Dict[int, ThreadTotals]  # host tid -> totals (read on the loop's thread)
    states: Dict[int, events.TargetState]  # pid -> kernel state, targets that have one
    live: FrozenSet[int]  # pids still traced
    sidecar_lost: int  # undecodable records and probe runs the kernel skipped
    stacks_lost: Dict[str, int] = field(default_factory=dict)  # reason -> holder stacks


# How often a GIL-less free-threaded target's _gil_runtime_state.enabled is read
# (one 4-byte pread): waits are traced from at most this long after the GIL is
# switched on.
GIL_WATCH_INTERVAL_NS = 50_000_000


class Session:
    def __init__(self, config: ProbeConfig,
                 on_interval: Optional[Callable[[events.Interval], None]] = None,
                 max_intervals: int = DEFAULT_MAX_INTERVALS,
                 refresh_interval_s: float = 1.0) -> None:
        self.intervals: List[events.Interval] = []
        self.max_intervals = max_intervals
        self.intervals_dropped = 0  # beyond max_intervals (no on_interval callback)
        self.refresh_interval_s = refresh_interval_s
        self._on_interval = on_interval or self._keep
        self.probes = Probes(config, self._on_interval)
        self.targets: Dict[int, TargetInfo] = {}
        self.threads: Dict[int, ThreadTotals] = {}
        self._start_times: Dict[int, Optional[str]] = {}
        self._names_read_ns = 0
        self._young: Dict[int, Tuple[int, int]] = {}  # tid: (first seen, name last read) ns
        self._exited_seen: List[int] = []  # exited threads, as of drop_exited_threads
        self._refreshed_ns = 0
        self._exits_checked_ns = 0
        self._skipped: Optional[int] = None  # frozen at close(), when the program goes
        # The kinds ("wait", "hold") whose every interval the kernel counts in a
        # per-thread histogram (fields of struct thread_stats). The contended set
        # sees holds only while another thread waits: its hold histogram holds
        # the long holds sent one by one, not every hold.
        fields = {f[0] for f in events.ThreadStats._fields_}
        kinds = ("wait",) if config.probes == "contended" else ("wait", "hold")
        self.histogram_kinds = tuple(k for k in kinds if f"{k}_hist" in fields)

    def _keep(self, iv: events.Interval) -> None:
        # Name each thread at its first event, while it still lives: the kernel's
        # totals are copied only now and then, and a short program's threads are
        # gone by the next copy (a holder the contended set saw has no entry).
        for tid in (iv.tid, *(h.tid for h in iv.holds)):
            if tid not in self.threads:
                self._totals(tid, iv.pid, False)
            elif tid in self._young:
                self._rename_young(tid, time.monotonic_ns())
        if len(self.intervals) < self.max_intervals:
            self.intervals.append(iv)
        else:
            self.intervals_dropped += 1

    def _rename_young(self, tid: int, now: int) -> None:
        """A thread names itself after it starts, often after its first wait
        (PR_SET_NAME): for 2 s its name is read again at its events, 10/s at most."""
        first, last = self._young[tid]
        totals = self.threads.get(tid)
        if totals is None or now - first > 2_000_000_000:
            del self._young[tid]
        elif now - last > 100_000_000:
            self._young[tid] = (first, now)
            name = procfs.thread_name(totals.pid, tid)
            totals.name = name if name != "?" else totals.name

    def add(self, pid: int, ctx_table: Optional[TableLocation] = None) -> Target:
        """Inspect and attach to a running Python process. Raises TargetError
        (TargetNotReady before its interpreter is up, TargetGone once it exits,
        also mid-attach) or ProbeError.

        A free-threaded process running with its GIL disabled is kept, without
        probes, and watched: step() attaches them once the GIL is switched on
        for good (an extension that does not declare Py_mod_gil was imported).
        """
        target = process.inspect_process(pid)
        process.require_gil(target, watch=True)  # refuses PYTHON_GIL=0
        started = procfs.start_time(pid)
        if target.gil.enabled is False:
            self._start_times[pid] = started
            self.targets[pid] = TargetInfo(target, time.monotonic_ns(), ctx_table=ctx_table,
                                           watched_ns=time.monotonic_ns())
            log.warning("otel-gil: pid %d: %s: nothing to measure yet; watching for it to be "
                        "enabled", pid, process.gil_state(target.gil.enabled_count))
            return target
        try:
            self.probes.add(target, ctx_table)
        except ProbeError as err:
            if procfs.exiting(pid):  # uprobe attach fails for a task gone meanwhile
                raise TargetGone(f"pid {pid} exited while its probes were being attached"
                                 ) from err
            raise
        if started is None or procfs.start_time(pid) != started:
            # Exited meanwhile: step() could never tell (it compares start times,
            # and a zombie's or a vanished process's is None, like this one).
            self.probes.remove(pid)
            raise TargetGone(f"pid {pid} exited while its probes were being attached")
        self._start_times[pid] = started
        now = time.monotonic_ns()
        info = TargetInfo(target, now, ctx_table=ctx_table, attached_ns=now)
        info.switch_start = info.switch_now = self.probes.read_switch_number(pid)
        self.targets[pid] = info
        return target

    def _watch_gil(self) -> None:
        """Attach the probes of watched targets whose GIL is now on for good.
        A transient enable (an extension's init) is not: it ends within that
        import, and take_gil returns at once again (Python/ceval_gil.c)."""
        now = time.monotonic_ns()
        for pid, info in self.targets.items():
            if info.attached_ns or info.ended_ns or now - info.watched_ns < GIL_WATCH_INTERVAL_NS:
                continue
            info.watched_ns = now
            count = process.gil_enabled_count(info.target)
            if count != process.GIL_ENABLED_PERMANENTLY:
                continue
            gil = replace(info.target.gil, enabled=True, enabled_count=count)
            info.target = replace(info.target, gil=gil)
            try:
                self.probes.add(info.target, info.ctx_table)
            except ProbeError as err:
                log.warning("otel-gil: pid %d: the GIL was enabled, but %s", pid, err)
                info.watched_ns = now + 10**9 * 3600  # said once; not retried
                continue
            info.attached_ns = info.gil_enabled_ns = time.monotonic_ns()
            info.switch_start = info.switch_now = self.probes.read_switch_number(pid)
            log.warning("otel-gil: pid %d: the GIL was enabled at run time: tracing from now",
                        pid)

    @property
    def traced(self) -> bool:
        """Whether any target ever had its probes attached."""
        return any(info.attached_ns for info in self.targets.values())

    @property
    def probe_set(self) -> str:
        return self.probes.config.probes

    def alive(self, pid: int) -> bool:
        return pid in self.targets and not self.targets[pid].ended_ns

    def step(self, timeout_ms: int = 100, refresh: bool = False) -> bool:
        """Deliver events, retire targets that exited, and refresh the totals when
        asked or refresh_interval_s old. Returns whether it refreshed."""
        self.probes.poll(timeout_ms)
        now = time.monotonic_ns()
        due = now - self._refreshed_ns >= self.refresh_interval_s * 1e9
        if refresh or due:
            self.refresh()
        self._watch_gil()
        if now - self._exits_checked_ns >= EXIT_CHECK_NS:  # a /proc read per target
            self._exits_checked_ns = now
            for pid, info in list(self.targets.items()):
                if not info.ended_ns and procfs.start_time(pid) != self._start_times.get(pid):
                    self.detach(pid)
        return refresh or due

    def detach(self, pid: int) -> None:
        """Stop tracing a target: last events and totals, then remove its probes."""
        info = self.targets.get(pid)
        if info is None or info.ended_ns:
            return
        self.probes.poll(0)
        self.refresh()
        info.ended_ns = time.monotonic_ns()
        self.probes.remove(pid)
        self.probes.poll(0)  # what the probes sent while they came off, still its process's

    def refresh(self) -> None:
        """Copy the kernel's per-thread entries; reap those of exited threads.
        Thread names are re-read at most once a second: apps name threads after start."""
        reaped: List[int] = []
        now = time.monotonic_ns()
        self._refreshed_ns = now
        reread = now - self._names_read_ns > 1_000_000_000
        if reread:
            self._names_read_ns = now
        contended = self.probe_set == "contended"
        for tid, raw in self.probes.threads().items():
            totals = self.threads.get(tid)
            if totals is None:
                totals = self._first_sighting(tid, raw)
            elif not raw.exited and (reread or totals.name == "?"):
                name = procfs.thread_name(raw.pid, tid)
                totals.name = name if name != "?" else totals.name
            totals.update(raw, contended)
            if raw.exited:
                reaped.append(tid)
        self.probes.forget_threads(reaped)
        for tid in reaped:
            self._young.pop(tid, None)
        if contended:
            self._refresh_holders(reread)
        for pid, info in self.targets.items():
            if not info.ended_ns:
                self._refresh_state(pid, info)

    def _refresh_holders(self, reap: bool) -> None:
        """Contended set: each holder's time held while another waited. A holder
        that never waited has no thread entry, so no exit mark: its entry is
        reaped once its thread is gone from /proc (checked with the names)."""
        gone: Dict[int, List[int]] = {}
        for (pid, ns_tid), held in self.probes.holders().items():
            tid = self.probes.host_tid(pid, ns_tid)
            totals = self._totals(tid, pid, False)
            totals.update_holds(held)
            if reap and not procfs.thread_alive(pid, tid):
                totals.exited = True
                gone.setdefault(pid, []).append(ns_tid)
        for pid, ns_tids in gone.items():
            self.probes.forget_holders(pid, ns_tids)

    def _totals(self, tid: int, pid: int, rename: bool) -> ThreadTotals:
        totals = self.threads.get(tid)
        if totals is None:
            totals = ThreadTotals(tid=tid, pid=pid)
            self.threads[tid] = totals
            self._young[tid] = (time.monotonic_ns(),) * 2
        if totals.name == "?" or rename:
            name, totals.ns_tid = procfs.thread_identity(pid, tid)
            totals.name = name if name != "?" else totals.name
        return totals

    def _refresh_state(self, pid: int, info: TargetInfo) -> None:
        """The kernel's per-process state; with the contended set, hand-offs are
        CPython's own switch_number since attach (no probe sees each one)."""
        info.state = self.probes.target_state(pid) or info.state
        sw = self.probes.read_switch_number(pid)
        if sw is not None:
            info.switch_now = sw
        if self.probe_set == "contended" and info.state is not None and \
                info.switch_start is not None and info.switch_now is not None:
            info.state.handoffs = max(0, info.switch_now - info.switch_start)

    def _first_sighting(self, tid: int, raw: events.ThreadStats) -> ThreadTotals:
        """A new thread: who it is, read from /proc while it still lives."""
        totals = ThreadTotals(tid=tid, pid=raw.pid)
        totals.name, totals.ns_tid = procfs.thread_identity(raw.pid, tid)
        self.threads[tid] = totals
        self._young[tid] = (time.monotonic_ns(),) * 2
        return totals

    def thread(self, tid: int) -> Optional[ThreadTotals]:
        """A thread's totals; one seen for the first time (in an event, before the
        next refresh) is read from the kernel on its own."""
        totals = self.threads.get(tid)
        if totals is None:
            raw = self.probes.thread(tid)
            if raw is not None:
                totals = self._first_sighting(tid, raw)
                totals.update(raw, self.probe_set == "contended")
        return totals

    def snapshot(self) -> Snapshot:
        """The totals as of the last refresh, for the metrics (sidecar/metrics.py)."""
        states = {pid: events.TargetState.from_buffer_copy(bytes(info.state))
                  for pid, info in self.targets.items() if info.state is not None}
        live = frozenset(pid for pid, info in self.targets.items() if not info.ended_ns)
        return Snapshot(dict(self.threads), states, live,
                        int(self.probes.undecodable + self.skipped_runs),
                        self.probes.stacks.losses(states))

    @property
    def active(self) -> bool:
        return any(not info.ended_ns for info in self.targets.values())

    def lost_events(self) -> int:
        """Everything that did not make it: ring buffer full, undecodable records,
        and probe runs the kernel skipped (see Probes.skipped_runs)."""
        kernel = sum(int(info.state.lost) for info in self.targets.values() if info.state)
        return kernel + self.probes.undecodable + self.skipped_runs

    @property
    def skipped_runs(self) -> int:
        if self._skipped is None:
            return self.probes.skipped_runs()
        return self._skipped

    def drop_exited_threads(self) -> List[int]:
        """The totals of threads that had already exited at the previous call
        (each was in a snapshot since, whose final values the metrics folded):
        a long-running sidecar beside a thread-per-request server would keep
        every thread it ever saw. Returns their tids (the metrics' to forget)."""
        dropped = [tid for tid in self._exited_seen
                   if tid in self.threads and self.threads[tid].exited]
        holders: Dict[int, List[int]] = {}  # its holder entry too, or it comes back
        for tid in dropped:
            totals = self.threads.pop(tid)
            self._young.pop(tid, None)
            holders.setdefault(totals.pid, []).append(totals.ns_tid or tid)
        for pid, ns_tids in holders.items():
            self.probes.forget_holders(pid, ns_tids)
        self._exited_seen = [tid for tid, t in self.threads.items() if t.exited]
        return dropped

    def forget(self, pid: int) -> None:
        """Drop an ended target and its threads (a long-running sidecar's memory),
        in the kernel too: a process forgotten alive (it uninstrumented) keeps
        threads whose entries the next refresh would read as new ones, and its
        totals would be counted again. Attached again, it starts from zero."""
        self.detach(pid)
        self.targets.pop(pid, None)
        self._start_times.pop(pid, None)
        self.probes.forget_holders(pid)
        self.probes.forget_threads([tid for tid, raw in self.probes.threads().items()
                                    if raw.pid == pid])
        for tid in [t for t, totals in self.threads.items() if totals.pid == pid]:
            del self.threads[tid]
            self._young.pop(tid, None)

    def close(self) -> None:
        for pid in list(self.targets):
            self.detach(pid)
        self._skipped = self.probes.skipped_runs()
        self.probes.close()
