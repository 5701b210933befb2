"""The sidecar: accepts registrations, traces the registered processes, exports spans.

Two ways to run it, one loop:
- `otel-gil sidecar --listen PATH`: long-running (a sidecar container, a node
  daemon); apps connect to PATH.
- spawned by `otel_gil.instrument()` with `--owner-fd FD`: a private sidecar
  for one app and its descendants (forked workers, which connect to the
  abstract `@name` the app bound and handed over as `--listen-fd`; see
  otel_gil.app.plan). It exits when the owner's end of FD has closed, which the
  kernel does when the app exits, SIGKILL included, and no process registered
  through it is still traced (a daemon's double fork, a re-exec'd master).

The kernel's per-thread totals are read when a metrics collection asks for
them (a reader's thread waits for the loop to refresh, see _before_collect),
or every REFRESH_S (exited threads are reaped then). Spans go through one
bounded queue (otel_gil/export/delivery.py); every loss is a metric and, at most once
a minute, one log line (otel_gil/sidecar/losses.py).

Its socket, who may register, its heap and its pace: otel_gil/sidecar/host.py.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from opentelemetry.sdk.metrics.export import MetricReader

from otel_gil.abi.slots import TableLocation
from otel_gil.app import protocol
from otel_gil.errors import OtelGilError
from otel_gil.export import delivery
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.sidecar.clock import Clock
from otel_gil.sidecar.host import EXPORT_BUDGET_NS, POLL_MS, Pace, limit_arenas, refusal, trim_heap
from otel_gil.sidecar.losses import LossLog, exporter_detail, sidecar_totals
from otel_gil.sidecar.metrics import GilMetrics
from otel_gil.sidecar.spans import SpanExport, default_exporter, export_name
from otel_gil.sidecar.threads import ThreadDirectory, read_counters
from otel_gil.target import process, procfs

log = logging.getLogger("otel_gil.sidecar")
EXPORT_DELAY_NS = 200_000_000
# A connection that has not registered by then is closed; at most this many
# connections at once. Both bound what a local user can hold open in a root
# sidecar (docs/security.md).
REGISTER_TIMEOUT_NS = 10_000_000_000
MAX_CLIENTS = 512
# Once a spawned sidecar's app is gone: a connection still to register keeps it
# up this long at most, and, if the app ever had processes connect, it lingers
# this long for the last of them (a daemon's double fork: the grandchild
# connects just after its parents exit).
REGISTER_GRACE_S = 5.0
ORPHAN_GRACE_S = 1.0
# Events awaiting export (EXPORT_DELAY_NS, then the export budget) are bounded
# with the span queue: PENDING_SHARE x its bytes at PENDING_BYTES an event (a
# wait with 16 holds, tracemalloc), so 8192 for the default 8 MiB; never fewer
# than MIN_PENDING (the name delay at ~2500/s). Beyond, dropped and counted.
PENDING_BYTES, PENDING_SHARE, MIN_PENDING = 4096, 4, 512
REFRESH_S = 5.0  # kernel totals at least this often (reaping, the contention window)
COLLECT_WAIT_S = 1.0  # how long a metrics collection waits for fresh totals
TRIM_EVERY_NS = 10_000_000_000  # malloc_trim costs ~0.1 ms once the heap is trimmed


@dataclass
class Client:
    sock: socket.socket
    reader: protocol.LineReader
    pid: Optional[int] = None  # host pid once registered
    owner: bool = False  # the app that spawned this sidecar (see Sidecar._orphaned)
    since_ns: int = 0  # when it connected (monotonic)


class Sidecar:
    def __init__(self, config: ProbeConfig, listener: Optional[socket.socket] = None,
                 owner_fd: Optional[int] = None, export: Optional[SpanExport] = None,
                 metric_readers: Optional[Callable[[], List[MetricReader]]] = None,
                 max_thread_labels: int = 20, owner_token: Optional[str] = None,
                 span_queue_bytes: int = delivery.QUEUE_BYTES) -> None:
        limit_arenas()
        self.clock = Clock()
        self.export = export if export is not None else SpanExport(
            self.clock, spans=delivery.SpanDelivery(default_exporter, queue_bytes=span_queue_bytes))
        self.export.stack_threshold_ns = config.stack_threshold_ns  # waits with holder stacks
        self._max_pending = max(MIN_PENDING, PENDING_SHARE * span_queue_bytes // PENDING_BYTES)
        self.session = Session(config, self._on_interval, refresh_interval_s=REFRESH_S)
        if "wait" in self.session.histogram_kinds:  # else the metrics need every wait
            self.session.probes.on_unparented = self.export.skip_unparented_wait
        trim_heap()
        self._loop_thread = threading.current_thread()
        self._refresh = threading.Condition()
        self._refresh_wanted = False
        self._refresh_gen = 0
        # The readers only now: a periodic one that starts before its MeterProvider
        # exists (while BCC compiles, seconds on a busy machine) complains at
        # every tick that it cannot collect.
        readers = metric_readers() if metric_readers is not None else []
        self.metrics = GilMetrics(self.session.histogram_kinds, readers, max_thread_labels,
                                  spans=lambda: (self.export.spans.counts(), self.export.skipped),
                                  before_collect=self._before_collect)
        self.losses = LossLog(
            lambda: sidecar_totals(self.export.spans, self.metrics.lost_events_total(),
                                   self.metrics.context_totals(), self.metrics.stacks_lost()),
            lambda new: exporter_detail(self.export.spans, new), time.monotonic_ns())
        self._trimmed_ns, self._trimmed_targets = time.monotonic_ns(), 0
        self._tables: Dict[int, TableLocation] = {}
        self._clients: Dict[int, Client] = {}  # by fd
        self._stop = False
        self._pending: Deque[Tuple[int, Any]] = deque()  # (arrival, interval), to export
        self._metrics_failed = False
        self._listener = listener  # from listen()
        self._selector = selectors.DefaultSelector()  # epoll: BCC's fds push ours past 1024
        # A spawned sidecar serves its app and the processes it started (forked
        # workers, daemons re-parented away from it): those that hold the app's
        # token, or descend from it. A long-running one serves any local process.
        self._owner_pid: Optional[int] = None
        self._owner_token = owner_token or ""
        if listener is not None:
            self._selector.register(listener, selectors.EVENT_READ)
        self._owner_gone_at: Optional[float] = None
        self._others_seen = False  # a process other than the owner connected
        self._exited_unregistered = 0  # registrations from processes gone before attach
        if owner_fd is not None:
            owner = socket.socket(fileno=owner_fd)
            self._owner_pid = protocol.peer_pid(owner)
            self._add_client(Client(owner, protocol.LineReader(), owner=True))

    def _on_interval(self, iv: Any) -> None:
        if len(self._pending) >= self._max_pending:  # the loop has fallen far behind
            self.export.spans.count_drop(iv.pid, export_name(iv), delivery.QUEUE_FULL)
            return
        self.export.seen(iv)
        self._pending.append((time.monotonic_ns(), iv))

    def _export_settled(self, everything: bool = False) -> bool:
        """Export intervals once EXPORT_DELAY_NS old. A thread publishes its name
        at its first span, which can come just after it first held the GIL: the
        delay lets a holder's name reach the table before the wait naming it is
        exported. At most EXPORT_BUDGET_NS of it per turn of the loop: a backlog
        (the sidecar was starved of CPU) must not keep it from the ring buffer.
        Returns whether it stopped on the budget with settled intervals left."""
        now = time.monotonic_ns()
        # (CPU time: a sidecar short of CPU would spend a wall budget descheduled)
        horizon, deadline = now - EXPORT_DELAY_NS, time.thread_time_ns() + EXPORT_BUDGET_NS
        done = 0  # the CPU clock is a system call, ~3% of the sidecar: read every 8th
        while self._pending and (everything or self._pending[0][0] <= horizon):
            if done and not done & 7 and not everything and time.thread_time_ns() > deadline:
                return True
            done += 1
            _, iv = self._pending.popleft()
            try:
                span = self.export.on_interval(iv)
                self.metrics.record_interval(iv, span)
            except Exception:  # noqa: BLE001 - one bad span must not stop tracing
                log.exception("otel-gil: exporting a GIL span failed")
        return False

    # ------------------------------------------------------------------ the loop

    def serve(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle_signal)
        try:
            pace, poll_ms = Pace(), POLL_MS
            while not self._stop:
                turn = time.monotonic()
                self._accept_and_read()
                with self._refresh:
                    wanted = self._refresh_wanted
                if self.session.step(poll_ms, refresh=wanted):
                    self._after_refresh()
                behind = self._export_settled()
                self._retire_exited()
                self._housekeeping()
                self._stop = self._stop or self._orphaned()
                poll_ms, rest = pace.after(behind, time.monotonic() - turn)
                if rest > 0 and not self._stop:
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
                unplaced, errors = read_counters(pid, table.address)
            except (OSError, ValueError, OtelGilError):
                continue  # gone, or not a table: its slots are refused elsewhere
            self.metrics.set_context_counters(pid, unplaced, errors)

    def _update_metrics(self) -> None:
        try:
            self.metrics.update(self.session.snapshot())
            self.metrics.forget_threads(self.session.drop_exited_threads())
        except Exception:  # noqa: BLE001 - metrics must never stop tracing
            if not self._metrics_failed:
                log.exception("otel-gil: updating metrics failed (reported once)")
            self._metrics_failed = True

    def _handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self._stop = True

    def _add_client(self, client: Client) -> None:
        client.since_ns = time.monotonic_ns()
        self._clients[client.sock.fileno()] = client
        self._selector.register(client.sock, selectors.EVENT_READ)

    def _accept_and_read(self) -> None:
        for key, _ in self._selector.select(0):
            sock = key.fileobj
            if sock is self._listener:
                self._accept()
                continue
            client = self._clients.get(key.fd)
            if client is not None:
                self._read(client)
        self._close_idle()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        if len(self._clients) >= MAX_CLIENTS:
            log.warning("otel-gil: refused a connection: %d already open", MAX_CLIENTS)
            conn.close()
            return
        self._add_client(Client(conn, protocol.LineReader()))

    def _close_idle(self) -> None:
        """Close connections that never registered: each costs the sidecar an fd."""
        horizon = time.monotonic_ns() - REGISTER_TIMEOUT_NS
        for client in list(self._clients.values()):
            if client.pid is None and not client.owner and client.since_ns < horizon:
                log.warning("otel-gil: closed a connection that did not register within %d s",
                            REGISTER_TIMEOUT_NS // 1_000_000_000)
                self._drop(client)

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

    def _refuse(self, pid: int, why: str) -> Dict[str, Any]:
        log.warning("otel-gil: refused pid %s: %s", pid, why)
        return {"ok": False, "error": f"registration refused: {why}"}

    def _register(self, client: Client, msg: Dict[str, Any]) -> Dict[str, Any]:
        pid = protocol.peer_pid(client.sock)
        if client.pid is not None:
            return self._refuse(pid, "expected one register message")
        try:
            reg = protocol.parse_registration(msg)
        except protocol.BadRegistration as err:
            return self._refuse(pid, str(err))
        why = refusal(reg, pid, None if client.owner else self._owner_pid, self._owner_token)
        if why:
            return self._refuse(pid, why)
        table = TableLocation(reg.ctx_table, reg.ctx_slots) if reg.ctx_table else None
        try:
            target = self.session.add(pid, table)
        except Exception as err:  # noqa: BLE001 - one registration must not stop the sidecar
            if procfs.exited(pid):  # a fork that exited at once (even mid-inspection): no flood
                self._exited_unregistered += 1
                log.debug("otel-gil: pid %s exited before it could be traced", pid)
                return {"ok": False, "error": "the process exited before it could be traced"}
            why = str(err) if isinstance(err, OtelGilError) else f"{type(err).__name__}: {err}"
            log.warning("otel-gil: cannot trace pid %s: %s", pid, why)
            return {"ok": False, "error": why}
        client.pid = pid
        if table is not None:
            self._tables[pid] = table
        resource = reg.resource
        directory = ThreadDirectory(pid, table, self._os_identity)
        self.export.add_process(pid, target.nspid[-1], resource, directory)
        self.metrics.add_process(pid, str(resource.get("service.name", "unknown")),
                                 target.nspid[-1], directory.name)
        log.info("otel-gil: tracing pid %s (%s)", pid, resource.get("service.name", "?"))
        reply: Dict[str, Any] = {"ok": True, "host_pid": pid}
        if target.gil.enabled is False:  # free-threaded, GIL off: watched (Session.add)
            reply["watching"] = process.gil_state(target.gil.enabled_count)
        return reply

    def _os_identity(self, tid: int) -> Optional[Tuple[str, int]]:
        """(OS name, tid in the app's namespace) of a thread, as Session.thread knows it."""
        totals = self.session.thread(tid)
        return (totals.name, totals.ns_tid) if totals is not None else None

    def _drop(self, client: Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        if client.pid is not None:
            self.session.detach(client.pid)
            self._export_settled(everything=True)
            self.export.remove_process(client.pid)
        if client.owner:
            self._owner_gone_at = time.monotonic()  # our app is gone; its descendants may not be
        else:
            self._others_seen = True

    def _orphaned(self) -> bool:
        """A spawned sidecar's app is gone, and so is every process it traced or
        that is about to register (within the grace periods)."""
        if self._owner_gone_at is None:
            return False
        now = time.monotonic()
        for c in self._clients.values():
            if c.pid is not None and self.session.alive(c.pid):
                return False
            if c.pid is None and now - c.since_ns / 1e9 < REGISTER_GRACE_S:
                return False
        others = self._others_seen or bool(self._clients)
        return not (others and now - self._owner_gone_at < ORPHAN_GRACE_S)

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
            self._tables.pop(pid, None)

    def close(self) -> None:
        self._read_context_counters()
        if self._exited_unregistered:
            n = self._exited_unregistered
            log.info("otel-gil: %d registered process%s exited before %s could be traced",
                     n, "" if n == 1 else "es", "it" if n == 1 else "they")
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
        self._selector.close()
