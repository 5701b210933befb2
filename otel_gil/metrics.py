"""GIL metrics from the sidecar, through the OpenTelemetry metrics API.

Totals (held and waited seconds, acquisitions, hand-offs, forced switches, lost
events) are kept exactly in the kernel; observable instruments report them, so
nothing is sampled and the cost does not grow with the GIL's traffic. The
duration histograms record each wait/hold at or above its threshold (those the
probes send one by one), with the wait's span as exemplar; every shorter one
is still in the totals. Names and units: otel_gil/names.py.

Labels: service.name and process.pid of the app, and thread.name, bounded per
process by OTEL_PYTHON_GIL_MAX_THREAD_LABELS (the rest become "other"). The
counters stay monotonic when threads exit: each label keeps its own running sum.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, set_span_in_context

from otel_gil import names, otlp
from otel_gil.events import Interval
from otel_gil.session import Session

log = logging.getLogger("otel_gil.metrics")

# Histogram boundaries, seconds: 1 ms (the default wait threshold) to 10 s.
BOUNDARIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

Labels = Tuple[Tuple[str, Any], ...]


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
    """Observes a Session; one instance per sidecar."""

    def __init__(self, session: Session, readers: List[MetricReader],
                 max_thread_labels: int = 20, resource: Optional[Resource] = None) -> None:
        self.session = session
        self.max_thread_labels = max_thread_labels
        self.provider = MeterProvider(metric_readers=readers, resource=resource)
        meter = self.provider.get_meter(names.INSTRUMENTATION_SCOPE)
        self._processes: Dict[int, ProcessLabels] = {}
        self._seen: Dict[int, Tuple[int, int, int]] = {}  # tid -> last (held, waited, acq)
        self._sums: Dict[Labels, _Sums] = {}
        self._window: Dict[int, Tuple[int, int, float]] = {}  # pid -> (mono, wait_ns, ratio)
        self._exited: Dict[int, Dict[str, int]] = {}  # pid -> last kernel process counters
        self.wait_hist = meter.create_histogram(
            names.WAIT_DURATION.name, unit=names.WAIT_DURATION.unit,
            description=names.WAIT_DURATION.doc, explicit_bucket_boundaries_advisory=BOUNDARIES)
        self.hold_hist = meter.create_histogram(
            names.HOLD_DURATION.name, unit=names.HOLD_DURATION.unit,
            description=names.HOLD_DURATION.doc, explicit_bucket_boundaries_advisory=BOUNDARIES)
        for metric, fn in ((names.HELD_TIME, self._observe_held),
                           (names.WAITED_TIME, self._observe_waited),
                           (names.ACQUISITIONS, self._observe_acquisitions),
                           (names.HANDOFFS, self._process_counter("handoffs")),
                           (names.FORCED_SWITCHES, self._process_counter("forced_switches")),
                           (names.LOST_EVENTS, self._observe_lost)):
            meter.create_observable_counter(metric.name, callbacks=[fn], unit=metric.unit,
                                            description=metric.doc)
        meter.create_observable_gauge(
            names.CONTENTION_RATIO.name, callbacks=[self._observe_contention],
            unit=names.CONTENTION_RATIO.unit, description=names.CONTENTION_RATIO.doc)

    # ------------------------------------------------------------ membership

    def add_process(self, pid: int, service: str, ns_pid: int,
                    thread_name: Callable[[int], str]) -> None:
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
        d = self._process_labels(pid)
        d[names.LABEL_THREAD] = self._thread_label(pid, tid)
        return tuple(sorted(d.items()))

    # ------------------------------------------------------------ recording

    def record_interval(self, iv: Interval, span: Optional[SpanContext]) -> None:
        """A wait/hold at or above its threshold; its span (if exported) is the exemplar."""
        attrs = dict(self._labels(iv.pid, iv.tid))
        ctx = set_span_in_context(NonRecordingSpan(span)) if span is not None else None
        hist = self.wait_hist if iv.kind == "wait" else self.hold_hist
        hist.record(iv.duration_ns / 1e9, attributes=attrs, context=ctx)

    def update(self) -> None:
        """Fold the session's per-thread totals into per-label running sums, and
        the contention window. Call it from the sidecar loop (cheap)."""
        for tid, t in list(self.session.threads.items()):  # naming may refresh the session
            last = self._seen.get(tid, (0, 0, 0))
            now = (t.hold_ns, t.wait_ns, t.acquisitions)
            if now == last:
                continue
            sums = self._sums.setdefault(self._labels(t.pid, tid), _Sums())
            sums.held_ns += max(0, now[0] - last[0])
            sums.waited_ns += max(0, now[1] - last[1])
            sums.acquisitions += max(0, now[2] - last[2])
            self._seen[tid] = now
        self._update_contention()

    def _update_contention(self, window_s: float = 5.0) -> None:
        mono = time.monotonic_ns()
        for pid, info in list(self.session.targets.items()):
            if info.ended_ns:
                continue
            waited = sum(t.wait_ns for t in self.session.threads.values() if t.pid == pid)
            prev = self._window.get(pid)
            if prev is None:
                self._window[pid] = (mono, waited, 0.0)
            elif mono - prev[0] >= window_s * 1e9:
                self._window[pid] = (mono, waited, (waited - prev[1]) / (mono - prev[0]))

    def forget(self, pid: int) -> None:
        """The process is gone: keep its label sums (monotonic), drop thread state."""
        info = self.session.targets.get(pid)
        if info is not None and info.state is not None:
            st = info.state
            self._exited[pid] = {"handoffs": st.handoffs, "forced_switches": st.forced_switches,
                                 "lost": st.lost}
        for tid in [t for t, tt in self.session.threads.items() if tt.pid == pid]:
            self._seen.pop(tid, None)
        self._window.pop(pid, None)

    # ------------------------------------------------------------ observing

    def _observe_sums(self, pick: Callable[[_Sums], float]) -> Iterable[Observation]:
        return [Observation(pick(s), dict(labels)) for labels, s in self._sums.items()]

    def _observe_held(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_sums(lambda s: s.held_ns / 1e9)

    def _observe_waited(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_sums(lambda s: s.waited_ns / 1e9)

    def _observe_acquisitions(self, _options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_sums(lambda s: s.acquisitions)

    def _process_values(self, key: str) -> Dict[int, int]:
        out = {pid: vals[key] for pid, vals in self._exited.items()}
        for pid, info in self.session.targets.items():
            if info.state is not None:
                out[pid] = int(getattr(info.state, key))
        return out

    def _process_counter(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(v, self._process_labels(pid))
                    for pid, v in self._process_values(key).items()]
        return observe

    def _observe_lost(self, _options: CallbackOptions) -> Iterable[Observation]:
        values = self._process_values("lost")
        total = [Observation(v, self._process_labels(pid)) for pid, v in values.items()]
        if self.session.probes.undecodable:
            total.append(Observation(self.session.probes.undecodable,
                                     {names.LABEL_SERVICE: "otel-gil-sidecar"}))
        return total

    def _observe_contention(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(ratio, self._process_labels(pid))
                for pid, (_, _, ratio) in self._window.items()]

    def shutdown(self) -> None:
        self.provider.shutdown()


def default_readers(prometheus_port: int, export_interval_ms: int = 5000) -> List[MetricReader]:
    """OTLP (honouring OTEL_EXPORTER_OTLP_*), and a Prometheus endpoint on the port
    (0: none). A port already in use is one warning, not a failure."""
    readers: List[MetricReader] = [PeriodicExportingMetricReader(
        otlp.exporter("metrics"), export_interval_millis=export_interval_ms)]
    if prometheus_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415
        from prometheus_client import start_http_server  # noqa: PLC0415

        try:
            start_http_server(prometheus_port)
            readers.append(PrometheusMetricReader())
        except OSError as exc:
            log.warning("otel-gil: no Prometheus endpoint on port %s: %s",
                        prometheus_port, exc.strerror)
    return readers
