"""A tracing session: the probes, the targets they watch, and per-thread totals.

`otel-gil record`, `top` and the sidecar all drive one Session: add targets,
call step() in a loop, read threads()/intervals. The session turns the kernel's
per-thread entries into ThreadTotals that outlive the threads (the kernel entry
of an exited thread is read one last time, then deleted).

The kernel's entries are copied (one batched map read) only when something
needs them: every refresh_interval_s (exited threads must be reaped before the
map fills), when step(refresh=True) asks (the sidecar, before a metrics
collection), at detach and close; a thread first seen in an event is looked up
on its own (thread()). Without an on_interval callback the session keeps the
first max_intervals intervals and counts the rest in intervals_dropped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from otel_gil import discovery, events, timeline
from otel_gil.discovery import Target
from otel_gil.probes import ContextTable, ProbeConfig, Probes


@dataclass
class ThreadTotals:
    """Everything known about one traced thread (host tid)."""

    tid: int
    pid: int
    ns_tid: int = 0  # tid in the target's own PID namespace
    name: str = "?"
    acquisitions: int = 0
    wait_ns: int = 0
    hold_ns: int = 0
    max_wait_ns: int = 0
    max_hold_ns: int = 0
    unmatched: int = 0
    exited: bool = False
    # None: the probe set keeps no such histogram (see Session.histogram_kinds)
    wait_hist: Optional[List[int]] = None
    hold_hist: Optional[List[int]] = None

    def update(self, raw: events.ThreadStats) -> None:
        """Copy what the kernel's struct has; a probe set may keep fewer fields."""
        for name in _TOTALS:
            setattr(self, name, int(getattr(raw, name, 0)))
        self.exited = bool(raw.exited)
        for name in _HISTOGRAMS:
            hist = getattr(raw, name, None)
            setattr(self, name, None if hist is None else list(hist))

    @property
    def p99_wait_ns(self) -> int:
        return timeline.percentile(self.wait_hist or [], 0.99)


_TOTALS = ("acquisitions", "wait_ns", "hold_ns", "max_wait_ns", "max_hold_ns", "unmatched")
_HISTOGRAMS = ("wait_hist", "hold_hist")
DEFAULT_MAX_INTERVALS = 20_000
EXIT_CHECK_NS = 250_000_000  # how often step() looks for targets that exited


@dataclass
class TargetInfo:
    target: Target
    started_ns: int  # CLOCK_MONOTONIC when its probes were attached
    ended_ns: int = 0
    state: Optional[events.Target] = None  # last read of the kernel's per-process state


def _thread_name(pid: int, tid: int) -> str:
    """The OS thread name, from /proc while the thread lives ("?" after)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def _thread_identity(pid: int, tid: int) -> Tuple[str, int]:
    """(OS thread name, tid in the target's namespace), from /proc while the thread lives."""
    ns_tid = tid
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ns_tid = int(line.split()[-1])
    except OSError:
        pass
    return _thread_name(pid, tid), ns_tid


def _start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat, which tells a live target from a reused pid;
    None once the process is gone or a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


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
        self._refreshed_ns = 0
        self._exits_checked_ns = 0
        self._skipped: Optional[int] = None  # frozen at close(), when the program goes
        # The kinds ("wait", "hold") whose every interval the kernel counts in a
        # per-thread histogram (fields of struct thread_stats).
        fields = {f[0] for f in events.ThreadStats._fields_}
        self.histogram_kinds = tuple(k for k in ("wait", "hold") if f"{k}_hist" in fields)

    def _keep(self, iv: events.Interval) -> None:
        if len(self.intervals) < self.max_intervals:
            self.intervals.append(iv)
        else:
            self.intervals_dropped += 1


    def add(self, pid: int, ctx_table: Optional[ContextTable] = None) -> Target:
        """Inspect and attach to a running Python process (raises TargetError)."""
        target = discovery.inspect_process(pid)
        discovery.require_gil(target)
        self._start_times[pid] = _start_time(pid)
        self.probes.add(target, ctx_table)
        self.targets[pid] = TargetInfo(target, time.monotonic_ns())
        return target

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
        if now - self._exits_checked_ns >= EXIT_CHECK_NS:  # a /proc read per target
            self._exits_checked_ns = now
            for pid, info in list(self.targets.items()):
                if not info.ended_ns and _start_time(pid) != self._start_times.get(pid):
                    self.detach(pid)
        return refresh or due

    def detach(self, pid: int) -> None:
        """Stop tracing a target: last events and totals, then remove its probes."""
        info = self.targets.get(pid)
        if info is None or info.ended_ns:
            return
        self.probes.poll(0)
        self.refresh()
        info.state = self.probes.target_state(pid) or info.state
        info.ended_ns = time.monotonic_ns()
        self.probes.remove(pid)

    def refresh(self) -> None:
        """Copy the kernel's per-thread entries; reap those of exited threads.
        Thread names are re-read at most once a second: apps name threads after start."""
        reaped: List[int] = []
        now = time.monotonic_ns()
        self._refreshed_ns = now
        reread = now - self._names_read_ns > 1_000_000_000
        if reread:
            self._names_read_ns = now
        for tid, raw in self.probes.threads().items():
            totals = self.threads.get(tid)
            if totals is None:
                totals = self._first_sighting(tid, raw)
            elif not raw.exited and (reread or totals.name == "?"):
                name = _thread_name(raw.pid, tid)
                totals.name = name if name != "?" else totals.name
            totals.update(raw)
            if raw.exited:
                reaped.append(tid)
        self.probes.forget_threads(reaped)
        for pid, info in self.targets.items():
            if not info.ended_ns:
                info.state = self.probes.target_state(pid) or info.state

    def _first_sighting(self, tid: int, raw: events.ThreadStats) -> ThreadTotals:
        """A new thread: who it is, read from /proc while it still lives."""
        totals = ThreadTotals(tid=tid, pid=raw.pid)
        totals.name, totals.ns_tid = _thread_identity(raw.pid, tid)
        self.threads[tid] = totals
        return totals

    def thread(self, tid: int) -> Optional[ThreadTotals]:
        """A thread's totals; one seen for the first time (in an event, before the
        next refresh) is read from the kernel on its own."""
        totals = self.threads.get(tid)
        if totals is None:
            raw = self.probes.thread(tid)
            if raw is not None:
                totals = self._first_sighting(tid, raw)
                totals.update(raw)
        return totals

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

    def forget(self, pid: int) -> None:
        """Drop an ended target and its threads (a long-running sidecar's memory)."""
        self.detach(pid)
        self.targets.pop(pid, None)
        self._start_times.pop(pid, None)
        for tid in [t for t, totals in self.threads.items() if totals.pid == pid]:
            del self.threads[tid]

    def close(self) -> None:
        for pid in list(self.targets):
            self.detach(pid)
        self._skipped = self.probes.skipped_runs()
        self.probes.close()


def pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
