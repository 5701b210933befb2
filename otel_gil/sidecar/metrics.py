"""GIL metrics from the sidecar, through the OpenTelemetry metrics API.

Totals (held and waited seconds, acquisitions, hand-offs, forced switches, lost
events) are kept exactly in the kernel; observable instruments report them, so
nothing is sampled and the cost does not grow with the GIL's traffic. The
duration histograms are the kernel's own per-thread histograms of every wait
and hold (otel_gil/sidecar/histograms.py), added to each collection, with the waits
that became spans as exemplars. Names and units: otel_gil/names.py.

The span pipeline is reported too: spans exported, dropped (by reason) and
skipped by design (by reason), and the app-side context table's problems.

Labels: service.name and process.pid of the app, and thread.name, bounded per
process by OTEL_PYTHON_GIL_MAX_THREAD_LABELS (the rest become "other"). The
counters stay monotonic when threads exit: each label keeps its own running sum.

Threads: update() and record_interval() run on the sidecar's loop; the
observations and collections on the metric readers' threads. One lock guards
what both touch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricReader,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource

from otel_gil import names
from otel_gil.abi.events import Interval, SpanRef
from otel_gil.export import delivery
from otel_gil.probes.session import Snapshot
from otel_gil.sidecar import collect, histograms
from otel_gil.sidecar import spans as export

log = logging.getLogger("otel_gil.metrics")

Labels = Tuple[Tuple[str, Any], ...]
SpanCounts = Callable[[], Tuple[export.Counts, export.Counts]]  # (delivery, skipped)
SPAN_NAMES = (names.GIL_WAIT.name, names.GIL_HOLD.name)
LABELS_TTL_NS = 1_000_000_000
# The kernel's per-process counters (struct target) that are exported as counters
_PROCESS_COUNTERS = ("handoffs", "forced_switches", "lost")


@dataclass
class ProcessLabels:
    service: str
    ns_pid: int
    thread_name: Callable[[int], str]  # host tid -> name
    names_seen: List[str] = field(default_factory=list)


@dataclass
class _Sums:
    held_ns: int = 0
    waited_ns: int = 0
    acquisitions: int = 0


class GilMetrics:
    """The sidecar's metrics, fed a Session's snapshot after each refresh (update);
    one instance per sidecar. histogram_kinds: Session.histogram_kinds."""

    def __init__(self, histogram_kinds: Tuple[str, ...], readers: List[MetricReader],
                 max_thread_labels: int = 20, resource: Optional[Resource] = None,
                 spans: Optional[SpanCounts] = None,
                 before_collect: Optional[Callable[[], None]] = None) -> None:
        self.histogram_kinds = histogram_kinds
        self._snapshot = Snapshot({}, {}, frozenset(), 0)  # the latest update()'s
        self.max_thread_labels = max_thread_labels
        self.resource = resource if resource is not None else Resource.create()
        self.provider = MeterProvider(metric_readers=readers, resource=self.resource)
        self._spans = spans
        self._before_collect = before_collect
        self._lock = threading.Lock()
        self._processes: Dict[int, ProcessLabels] = {}
        self._seen: Dict[int, Tuple[int, int, int]] = {}  # tid -> last (held, waited, acq)
        self._sums: Dict[Labels, _Sums] = {}
        self._window: Dict[int, Tuple[int, int, float]] = {}  # pid -> (mono, wait_ns, ratio)
        self._waited_gone: Dict[int, int] = {}  # pid -> wait_ns of its forgotten threads
        self._exited: Dict[int, Dict[str, int]] = {}  # pid -> forgotten process counters
        self._context: Dict[int, Tuple[int, int]] = {}  # pid -> app's (unplaced, errors)
        self._label_cache: Dict[int, Tuple[Labels, int, int]] = {}  # tid -> (labels, when, pid)
        self.histograms = {"wait": histograms.HistogramSet(), "hold": histograms.HistogramSet()}
        self._readers: Dict[int, collect.ReaderState] = {}
        self._start_ns = time.time_ns()
        self._create_instruments()
        for reader in readers:
            self._hook(reader)

    def _create_instruments(self) -> None:
        meter = self.provider.get_meter(names.INSTRUMENTATION_SCOPE)
        for metric, fn in ((names.HELD_TIME, self._observe_held),
                           (names.WAITED_TIME, self._observe_waited),
                           (names.ACQUISITIONS, self._observe_acquisitions),
                           (names.HANDOFFS, self._process_counter("handoffs")),
                           (names.FORCED_SWITCHES, self._process_counter("forced_switches")),
                           (names.LOST_EVENTS, self._observe_lost),
                           (names.SPANS_EXPORTED, self._observe_exported),
                           (names.SPANS_DROPPED, self._observe_dropped),
                           (names.SPANS_SKIPPED, self._observe_skipped),
                           (names.CONTEXT_UNPLACED, self._context_counter(0)),
                           (names.CONTEXT_ERRORS, self._context_counter(1)),
                           (names.STACKS_LOST, self._observe_stacks_lost)):
            meter.create_observable_counter(metric.name, callbacks=[fn], unit=metric.unit,
                                            description=metric.doc)
        meter.create_observable_gauge(
            names.CONTENTION_RATIO.name, callbacks=[self._observe_contention],
            unit=names.CONTENTION_RATIO.unit, description=names.CONTENTION_RATIO.doc)

    # ------------------------------------------------------------ membership

    def add_process(self, pid: int, service: str, ns_pid: int,
                    thread_name: Callable[[int], str]) -> None:
        with self._lock:
            self._processes[pid] = ProcessLabels(service, ns_pid, thread_name)

    def _process_labels(self, pid: int) -> Dict[str, Any]:
        proc = self._processes.get(pid)
        return {names.LABEL_SERVICE: proc.service if proc else "unknown",
                names.LABEL_PID: proc.ns_pid if proc else pid}

    def _thread_label(self, pid: int, tid: int) -> str:
        proc = self._processes.get(pid)
        if proc is None:
            return names.OTHER_THREADS
        name = proc.thread_name(tid)
        if name in proc.names_seen:
            return name
        if len(proc.names_seen) < self.max_thread_labels:
            proc.names_seen.append(name)
            return name
        return names.OTHER_THREADS

    def _labels(self, pid: int, tid: int) -> Labels:
        """A thread's labels, worked out again at most once a second (names are
        published or changed after a thread starts; this runs once per event)."""
        now = time.monotonic_ns()
        hit = self._label_cache.get(tid)
        if hit is not None and now - hit[1] < LABELS_TTL_NS and hit[2] == pid:
            return hit[0]
        d = self._process_labels(pid)
        d[names.LABEL_THREAD] = self._thread_label(pid, tid)
        labels = tuple(sorted(d.items()))
        self._label_cache[tid] = (labels, now, pid)
        return labels

    def set_context_counters(self, pid: int, unplaced: int, errors: int) -> None:
        """The app's own counters, read from its context table's header."""
        with self._lock:
            self._context[pid] = (unplaced, errors)

    # ------------------------------------------------------------ recording

    def record_interval(self, iv: Interval, span: Optional[SpanRef]) -> None:
        """A wait/hold at or above its threshold; its span (if exported) is the exemplar."""
        labels = self._labels(iv.pid, iv.tid)
        exemplar = None
        if span is not None:
            exemplar = histograms.Exemplar(time.time_ns(), iv.duration_ns, span.trace_id,
                                           span.span_id)
        with self._lock:
            self.histograms[iv.kind].record_event(
                labels, iv.duration_ns, exemplar,
                from_kernel=iv.kind in self.histogram_kinds)

    def update(self, snapshot: Snapshot) -> None:
        """Fold a snapshot's per-thread totals and histograms into per-label
        running sums, and the contention window; the observers report its
        kernel counters from now on. Call it after Session.refresh()."""
        rows = [(tid, t, self._labels(t.pid, tid)) for tid, t in snapshot.threads.items()]
        with self._lock:
            self._snapshot = snapshot
            for tid, t, labels in rows:
                self._fold_sums(tid, labels, (t.hold_ns, t.wait_ns, t.acquisitions))
                self.histograms["wait"].fold_thread(tid, labels, t.wait_hist, t.wait_ns,
                                                    t.max_wait_ns)
                self.histograms["hold"].fold_thread(tid, labels, t.hold_hist, t.hold_ns,
                                                    t.max_hold_ns)
            self._update_contention()

    def _fold_sums(self, tid: int, labels: Labels, now: Tuple[int, int, int]) -> None:
        last = self._seen.get(tid, (0, 0, 0))
        if now == last:
            return
        if any(n < o for n, o in zip(now, last)):
            last = (0, 0, 0)  # a new thread reusing the tid
        sums = self._sums.setdefault(labels, _Sums())
        sums.held_ns += now[0] - last[0]
        sums.waited_ns += now[1] - last[1]
        sums.acquisitions += now[2] - last[2]
        self._seen[tid] = now

    def _update_contention(self, window_s: float = 5.0) -> None:
        mono = time.monotonic_ns()
        snap = self._snapshot
        for pid in snap.live:
            waited = self._waited_gone.get(pid, 0) + sum(
                t.wait_ns for t in snap.threads.values() if t.pid == pid)
            prev = self._window.get(pid)
            if prev is None:
                self._window[pid] = (mono, waited, 0.0)
            elif mono - prev[0] >= window_s * 1e9:
                self._window[pid] = (mono, waited, (waited - prev[1]) / (mono - prev[0]))

    def forget(self, pid: int) -> None:
        """The process is gone: keep its label sums (monotonic), drop thread state
        (as the latest snapshot has them: update() first). Its counters are kept
        too, and added to those of a process of the same pid attached later (the
        same process instrumented again: its kernel state starts from zero)."""
        snap = self._snapshot
        tids = [t for t, tt in snap.threads.items() if tt.pid == pid]
        with self._lock:  # (the readers' threads observe the snapshot's states)
            st = snap.states.pop(pid, None)  # once: a second forget finds nothing to add
            if st is not None:
                kept = self._exited.setdefault(pid, dict.fromkeys(_PROCESS_COUNTERS, 0))
                for key in _PROCESS_COUNTERS:
                    kept[key] += int(getattr(st, key))
            self._forget_threads(tids)
            self._window.pop(pid, None)
            self._waited_gone.pop(pid, None)

    def forget_threads(self, tids: List[int]) -> None:
        """Exited threads whose final totals are folded into their labels' sums
        (in the latest snapshot: update() first); the contention window goes on
        counting their waits."""
        with self._lock:
            for tid in tids:
                t = self._snapshot.threads.get(tid)
                if t is not None and t.pid in self._window:
                    self._waited_gone[t.pid] = self._waited_gone.get(t.pid, 0) + t.wait_ns
            self._forget_threads(tids)

    def _forget_threads(self, tids: List[int]) -> None:
        for tid in tids:
            self._seen.pop(tid, None)
            self._label_cache.pop(tid, None)
        for hset in self.histograms.values():
            hset.forget_threads(tids)

    # ------------------------------------------------------------ observing

    def _observe_sums(self, pick: Callable[[_Sums], float]) -> Iterable[Observation]:
        with self._lock:
            return [Observation(pick(s), dict(labels)) for labels, s in self._sums.items()]

    def _observe_held(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_sums(lambda s: s.held_ns / 1e9)

    def _observe_waited(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_sums(lambda s: s.waited_ns / 1e9)

    def _observe_acquisitions(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_sums(lambda s: s.acquisitions)

    def _process_values(self, key: str) -> Dict[int, int]:
        out = {pid: vals[key] for pid, vals in self._exited.items()}
        for pid, state in self._snapshot.states.items():
            out[pid] = out.get(pid, 0) + int(getattr(state, key))
        return out

    def _process_counter(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                return [Observation(v, self._process_labels(pid))
                        for pid, v in self._process_values(key).items()]
        return observe

    def _observe_lost(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            values = self._process_values("lost")
            total = [Observation(v, self._process_labels(pid)) for pid, v in values.items()]
        own = self._sidecar_lost()
        if own:
            total.append(Observation(own, {names.LABEL_SERVICE: "otel-gil-sidecar"}))
        return total

    def _observe_stacks_lost(self, _options: CallbackOptions) -> Iterable[Observation]:
        """Sidecar-wide, one series per reason, zeros included."""
        lost = self._snapshot.stacks_lost
        return [Observation(n, {names.LABEL_SERVICE: "otel-gil-sidecar", names.LABEL_REASON: r})
                for r, n in sorted(lost.items())]

    def stacks_lost(self) -> Dict[str, int]:
        """otel_gil.stacks.lost as of the last snapshot, by reason."""
        return dict(self._snapshot.stacks_lost)

    def _sidecar_lost(self) -> int:
        """Losses not tied to one process: undecodable records, skipped probe runs."""
        return self._snapshot.sidecar_lost

    def lost_events_total(self) -> int:
        """Everything otel_gil.lost_events counts, summed."""
        with self._lock:
            kernel = sum(self._process_values("lost").values())
        return kernel + self._sidecar_lost()

    def context_totals(self) -> Tuple[int, int]:
        """(unplaced threads, context errors) summed over the apps."""
        with self._lock:
            return (sum(u for u, _ in self._context.values()),
                    sum(e for _, e in self._context.values()))

    def _span_observations(self, outcomes: Sequence[str], skipped: bool) -> List[Observation]:
        """One series per process, span name and outcome, zeros included: a
        dashboard can then tell "nothing dropped" from "no data"."""
        counts: export.Counts = {}
        if self._spans is not None:
            counts = self._spans()[1 if skipped else 0]
        with self._lock:
            pids = list(self._processes)
            out = []
            for pid in pids:
                for span in SPAN_NAMES:
                    for outcome in outcomes:
                        attrs = self._process_labels(pid)
                        attrs[names.LABEL_SPAN] = span
                        if outcome != delivery.EXPORTED:
                            attrs[names.LABEL_REASON] = outcome
                        out.append(Observation(counts.get((pid, span, outcome), 0), attrs))
        return out

    def _observe_exported(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._span_observations((delivery.EXPORTED,), skipped=False)

    def _observe_dropped(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._span_observations(delivery.DROP_REASONS, skipped=False)

    def _observe_skipped(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._span_observations(export.SKIP_REASONS, skipped=True)

    def _context_counter(self, index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                return [Observation(self._context.get(pid, (0, 0))[index],
                                    self._process_labels(pid)) for pid in self._processes]
        return observe

    def _observe_contention(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(ratio, self._process_labels(pid))
                    for pid, (_, _, ratio) in self._window.items()]

    # ------------------------------------------------------------ histograms

    def _hook(self, reader: MetricReader) -> None:
        """Add the duration histograms to every collection of this reader. The
        SDK (1.20 to 1.45) has no MetricProducer for pre-aggregated data, so the
        collection callback the MeterProvider installed is wrapped."""
        original = getattr(reader, "_collect", None)
        if original is None:
            log.warning("otel-gil: metric reader %s not registered: no duration histograms",
                        type(reader).__name__)
            return

        def collect(r: MetricReader, timeout_millis: float = 10_000) -> Any:
            if self._before_collect is not None:
                self._before_collect()
            data = original(r, timeout_millis=timeout_millis)
            try:
                return self._add_histograms(r, data)
            except Exception:  # noqa: BLE001 - never lose the other metrics
                log.exception("otel-gil: building the duration histograms failed")
                return data

        reader._set_collect_callback(collect)

    def _add_histograms(self, reader: MetricReader, data: Optional[MetricsData]) -> Any:
        temporality = collect.histogram_temporality(reader)
        now = time.time_ns()
        with self._lock:
            state = self._readers.setdefault(id(reader), collect.ReaderState(self._start_ns))
            built = [collect.histogram_metric(metric, self.histograms[kind], kind, state,
                                              temporality, now, self._start_ns)
                     for metric, kind in ((names.WAIT_DURATION, "wait"),
                                          (names.HOLD_DURATION, "hold"))]
            state.last_ns = now
        metrics = [m for m in built if m is not None]
        if not metrics:
            return data
        return collect.with_metrics(data, metrics, self.resource)

    def shutdown(self) -> None:
        self.provider.shutdown()


