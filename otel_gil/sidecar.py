"""The sidecar: accepts registrations, traces the registered processes, exports spans.

Two ways to run it, one loop:
- `otel-gil sidecar --listen PATH`: long-running (a sidecar container, a node
  daemon); apps connect to PATH.
- spawned by `otel_gil.instrument()` with `--owner-fd FD`: a private sidecar
  for one app (and the workers it forks, which connect to its abstract
  `--listen @name`). It exits when the owner's end of FD closes, which the
  kernel does when the app exits, SIGKILL included.

The kernel's per-thread totals are read when a metrics collection asks for
them (a reader's thread waits for the loop to refresh, see _before_collect),
or every REFRESH_S (exited threads are reaped then). Spans go through one
bounded queue (otel_gil/delivery.py); every loss is a metric and, at most once
a minute, one log line (otel_gil/losses.py).

Memory: libbcc compiles the BPF program with clang/LLVM in this process and
frees ~30 MB afterwards that glibc keeps (trim_heap returns it), and every
thread that allocates gets its own malloc arena (limit_arenas caps them).
bench/README.md has the breakdown.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import Any, Deque, Dict, List, Optional, Tuple

from opentelemetry.sdk.metrics.export import MetricReader

from otel_gil import context, delivery, protocol
from otel_gil.clock import Clock
from otel_gil.errors import OtelGilError
from otel_gil.export import SpanExport, ThreadDirectory, ThreadInfo, default_exporter, export_name
from otel_gil.losses import LossLog, Totals
from otel_gil.metrics import GilMetrics
from otel_gil.probes import ContextTable, ProbeConfig
from otel_gil.session import Session

log = logging.getLogger("otel_gil.sidecar")
NAMES_TTL_NS = 50_000_000
EXPORT_DELAY_NS = 200_000_000
POLL_MS = 100  # the loop's longest sleep: events wake it sooner
MIN_TURN_S = 0.02  # and its shortest turn (see serve); the ring buffer holds seconds of events
EXPORT_BUDGET_NS = 20_000_000  # export work per loop turn, so the ring buffer is drained
MAX_PENDING = 8192  # intervals waiting for export; beyond, dropped and counted
REFRESH_S = 5.0  # kernel totals at least this often (reaping, the contention window)
COLLECT_WAIT_S = 1.0  # how long a metrics collection waits for fresh totals
TRIM_EVERY_NS = 10_000_000_000  # malloc_trim costs ~0.1 ms once the heap is trimmed
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


@dataclass
class Client:
    sock: socket.socket
    reader: protocol.LineReader
    pid: Optional[int] = None  # host pid once registered
    owner: bool = False  # the app that spawned this sidecar: when it goes, we go


class Sidecar:
    def __init__(self, config: ProbeConfig, listen: Optional[str] = None,
                 owner_fd: Optional[int] = None, export: Optional[SpanExport] = None,
                 metric_readers: Optional[List[MetricReader]] = None,
                 max_thread_labels: int = 20,
                 span_queue_bytes: int = delivery.QUEUE_BYTES) -> None:
        limit_arenas()
        self.clock = Clock()
        self.export = export if export is not None else SpanExport(
            self.clock, spans=delivery.SpanDelivery(default_exporter, queue_bytes=span_queue_bytes))
        self.session = Session(config, self._on_interval, refresh_interval_s=REFRESH_S)
        trim_heap()
        self._loop_thread = threading.current_thread()
        self._refresh = threading.Condition()
        self._refresh_wanted = False
        self._refresh_gen = 0
        self.metrics = GilMetrics(self.session, metric_readers or [], max_thread_labels,
                                  spans=lambda: (self.export.spans.counts(), self.export.skipped),
                                  before_collect=self._before_collect)
        self.losses = LossLog(self._loss_totals, self._loss_detail, time.monotonic_ns())
        self._trimmed_ns = time.monotonic_ns()
        self._trimmed_targets = 0
        self._tables: Dict[int, ContextTable] = {}
        self._clients: Dict[int, Client] = {}  # by fd
        self._stop = False
        self._pending: Deque[Tuple[int, Any]] = deque()  # (arrival, interval), to export
        self._names: Dict[int, Tuple[int, Dict[int, Tuple[int, str]]]] = {}
        self._metrics_failed = False
        self._listener: Optional[socket.socket] = None
        if listen:
            self._listener = _listen(listen)
        if owner_fd is not None:
            owner = socket.socket(fileno=owner_fd)
            self._clients[owner.fileno()] = Client(owner, protocol.LineReader(), owner=True)

    def _on_interval(self, iv: Any) -> None:
        if len(self._pending) >= MAX_PENDING:  # the loop has fallen far behind
            self.export.spans.count_drop(iv.pid, export_name(iv), delivery.QUEUE_FULL)
            return
        self._pending.append((time.monotonic_ns(), iv))

    def _export_settled(self, everything: bool = False) -> None:
        """Export intervals once EXPORT_DELAY_NS old. A thread publishes its name
        at its first span, which can come just after it first held the GIL: the
        delay lets a holder's name reach the table before the wait naming it is
        exported. At most EXPORT_BUDGET_NS of it per turn of the loop: a backlog
        (the sidecar was starved of CPU) must not keep it from the ring buffer."""
        now = time.monotonic_ns()
        horizon, deadline = now - EXPORT_DELAY_NS, now + EXPORT_BUDGET_NS
        while self._pending and (everything or self._pending[0][0] <= horizon):
            if not everything and time.monotonic_ns() > deadline:
                return
            _, iv = self._pending.popleft()
            try:
                span = self.export.on_interval(iv)
                self.metrics.record_interval(iv, span)
            except Exception:  # noqa: BLE001 - one bad span must not stop tracing
                log.exception("otel-gil: exporting a GIL span failed")

    # ------------------------------------------------------------------ the loop

    def serve(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle_signal)
        try:
            while not self._stop:
                turn = time.monotonic()
                self._accept_and_read()
                with self._refresh:
                    wanted = self._refresh_wanted
                if self.session.step(POLL_MS, refresh=wanted):
                    self._after_refresh()
                self._export_settled()
                self._retire_exited()
                self._housekeeping()
                # Under load the ring buffer wakes the loop for every event or two;
                # a turn of at least MIN_TURN_S lets records pile up and be taken
                # in one poll (the turn's own cost is then shared by dozens).
                rest = MIN_TURN_S - (time.monotonic() - turn)
                if rest > 0:
                    time.sleep(rest)
        finally:
            self.close()

    def _housekeeping(self) -> None:
        now = time.monotonic_ns()
        self.clock.refresh_if_older_than(10.0)
        self.losses.maybe_log(now)
        # Inspecting a new target (ELF, DWARF, disassembly) frees tens of MB
        # glibc would otherwise keep; and every 10 s whatever bursts left.
        targets = len(self.session.targets)
        if targets != self._trimmed_targets or now - self._trimmed_ns > TRIM_EVERY_NS:
            trim_heap()
            self._trimmed_ns, self._trimmed_targets = now, targets

    def _before_collect(self) -> None:
        """A metric reader is about to collect (on its own thread): have the loop
        read the kernel's totals now, and wait for that, briefly."""
        if threading.current_thread() is self._loop_thread:
            return  # the final collection at shutdown: the loop has just refreshed
        with self._refresh:
            gen = self._refresh_gen
            self._refresh_wanted = True
            self._refresh.wait_for(lambda: self._refresh_gen != gen or self._stop,
                                   timeout=COLLECT_WAIT_S)

    def _after_refresh(self) -> None:
        self._read_context_counters()
        self._update_metrics()
        with self._refresh:
            self._refresh_wanted = False
            self._refresh_gen += 1
            self._refresh.notify_all()

    def _read_context_counters(self) -> None:
        for pid, table in list(self._tables.items()):
            if not self.session.alive(pid):
                continue
            try:
                unplaced, errors = context.read_counters(pid, table.address)
            except (OSError, ValueError, OtelGilError):
                continue  # gone, or not a table: its slots are refused elsewhere
            self.metrics.set_context_counters(pid, unplaced, errors)

    def _update_metrics(self) -> None:
        try:
            self.metrics.update()
        except Exception:  # noqa: BLE001 - metrics must never stop tracing
            if not self._metrics_failed:
                log.exception("otel-gil: updating metrics failed (reported once)")
            self._metrics_failed = True

    def _loss_totals(self) -> Totals:
        totals: Totals = {}
        for (_, _, outcome), n in self.export.spans.counts().items():
            if outcome != delivery.EXPORTED:
                key = f"spans dropped ({outcome})"
                totals[key] = totals.get(key, 0) + n
        totals["kernel events lost"] = self.metrics.lost_events_total()
        unplaced, errors = self.metrics.context_totals()
        totals["app threads without a context slot"] = unplaced
        totals["app context errors"] = errors
        return totals

    def _loss_detail(self, new: Totals) -> Optional[str]:
        last = self.export.spans.exporter_log.last
        if last and any(k.startswith("spans dropped") for k in new):
            return f"last exporter error: {last}"
        return None

    def _handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self._stop = True

    def _accept_and_read(self) -> None:
        socks = [c.sock for c in self._clients.values()]
        if self._listener is not None:
            socks.append(self._listener)
        readable, _, _ = select.select(socks, [], [], 0)
        for s in readable:
            if s is self._listener:
                conn, _ = s.accept()
                self._clients[conn.fileno()] = Client(conn, protocol.LineReader())
                continue
            self._read(self._clients[s.fileno()])

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(4096)
            messages = client.reader.feed(data) if data else None
        except (OSError, ValueError):
            messages = None
        if messages is None:  # closed, or garbage: the app is gone or broken
            self._drop(client)
            return
        for msg in messages:
            reply = self._register(client, msg)
            try:
                client.sock.sendall(protocol.encode(reply))
            except OSError:
                self._drop(client)
                return

    def _register(self, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
        if msg.get("op") != "register" or client.pid is not None:
            return {"ok": False, "error": "expected one register message"}
        pid = protocol.peer_pid(client.sock)
        claimed = msg.get("pid")
        nspid = _nspid(pid)
        if claimed is not None and claimed not in nspid:
            log.warning("otel-gil: refused: pid %s asked to trace pid %s", pid, claimed)
            return {"ok": False, "error": f"registration refused: the connecting process is "
                                          f"pid {nspid[-1]}, not {claimed}; a process may only "
                                          "ask for itself to be traced"}
        table = None
        if msg.get("ctx_table"):
            table = ContextTable(int(msg["ctx_table"]), int(msg.get("ctx_slots", 0)))
        try:
            target = self.session.add(pid, table)
        except OtelGilError as err:
            log.warning("otel-gil: cannot trace pid %s: %s", pid, err)
            return {"ok": False, "error": str(err)}
        client.pid = pid
        if table is not None:
            self._tables[pid] = table
        resource = msg.get("resource") or {}
        directory = ThreadDirectory(
            lambda tid, published: self._thread_info(pid, tid, table, published))
        self.export.add_process(pid, target.nspid[-1], resource, directory)
        self.metrics.add_process(pid, str(resource.get("service.name", "unknown")),
                                 target.nspid[-1], lambda tid: directory(tid).name)
        log.info("otel-gil: tracing pid %s (%s)", pid, resource.get("service.name", "?"))
        return {"ok": True, "host_pid": pid}

    def _thread_info(self, pid: int, tid: int, table: Optional[ContextTable],
                     published: bool = False) -> ThreadInfo:
        """Who a thread is: its Python ident and name from the app's table, else
        its OS name. Threads publish their name at their first span, so a thread
        not found is looked up again (ThreadDirectory.RETRY_NS). published: the
        thread is known to be in the table (its span came from there)."""
        totals = self.session.thread(tid)  # read on its own if new since the last refresh
        ns_tid = totals.ns_tid if totals else tid
        name = totals.name if totals else "?"
        ident = None
        if table is not None:
            names = self._published_names(pid, table)
            if published and ns_tid not in names:
                names = self._published_names(pid, table, fresh=True)
            if ns_tid in names:
                ident, py_name = names[ns_tid]
                name = py_name or name
        return ThreadInfo(tid, ns_tid, name, ident)

    def _published_names(self, pid: int, table: ContextTable,
                         fresh: bool = False) -> Dict[int, Tuple[int, str]]:
        """The app's table, read at most once per NAMES_TTL_NS per process."""
        now = time.monotonic_ns()
        cached = self._names.get(pid)
        if fresh or cached is None or now - cached[0] > NAMES_TTL_NS:
            try:
                names = context.read_thread_names(pid, table.address)
            except (OSError, ValueError, OtelGilError):
                names = {}
            cached = (now, names)
            self._names[pid] = cached
        return cached[1]

    def _drop(self, client: Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        client.sock.close()
        if client.pid is not None:
            self.session.detach(client.pid)
            self._export_settled(everything=True)
            self.export.remove_process(client.pid)
        if client.owner:
            self._stop = True  # our app is gone

    def _retire_exited(self) -> None:
        """A long-running sidecar forgets processes once they are gone and flushed."""
        ended = [p for p, info in self.session.targets.items() if info.ended_ns]
        if ended:
            self._export_settled(everything=True)
        for pid in ended:
            self._update_metrics()
            self.export.remove_process(pid)
            self.metrics.forget(pid)
            self.session.forget(pid)
            self._names.pop(pid, None)
            self._tables.pop(pid, None)

    def close(self) -> None:
        self._read_context_counters()
        self.session.close()
        self._export_settled(everything=True)
        self._update_metrics()
        self.export.close()
        self.losses.final(time.monotonic_ns())
        self.metrics.shutdown()
        for c in list(self._clients.values()):
            c.sock.close()
        if self._listener is not None:
            self._listener.close()


def _nspid(pid: int) -> Tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return tuple(int(x) for x in line.split()[1:])
    except OSError:
        pass
    return (pid,)


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not path.startswith("@"):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    sock.bind(protocol.unix_address(path))
    if not path.startswith("@"):
        os.chmod(path, 0o666)  # any local process may ask to be traced (itself only)
    sock.listen(64)
    return sock
