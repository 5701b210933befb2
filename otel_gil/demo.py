"""`otel-gil demo`: run examples/demo_app.py under otel-gil, load it with real HTTP
requests, and show which requests waited for the GIL, and behind whom.

With no OTLP endpoint configured, an embedded OTLP/gRPC receiver on loopback
collects the app's spans and its sidecar's (the spawned sidecar inherits the
app's environment, OTEL_EXPORTER_OTLP_* included), and summarize() turns them into
the result. With OTEL_EXPORTER_OTLP_ENDPOINT set, everything goes there.
`load()` alone is the load generator the compose file's loadgen runs.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import SplitResult, urlsplit

import otel_gil
from otel_gil import names
from otel_gil.errors import OtelGilError

# About one /cpu request per three /light ones; each client starts at a
# different point of the cycle so that the kinds interleave.
MIX = ("/cpu", "/light", "/light", "/light")
CLIENTS = 6
APP = Path("examples") / "demo_app.py"


def say(message: str) -> None:
    """Progress: one line on stderr."""
    print(f"demo: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- load generator


@dataclass
class LoadStats:
    by_path: Dict[str, int] = field(default_factory=dict)
    errors: int = 0
    last_error: str = ""
    elapsed_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ok(self, path: str) -> None:
        with self._lock:
            self.by_path[path] = self.by_path.get(path, 0) + 1

    def failed(self, why: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = why

    @property
    def sent(self) -> int:
        return sum(self.by_path.values())

    def line(self) -> str:
        paths = ", ".join(f"{n} {p}" for p, n in sorted(self.by_path.items()))
        last = f" (last: {self.last_error})" if self.errors else ""
        return f"{self.sent} requests ({paths or 'none yet'}), {self.errors} errors{last}"

    def to_json(self) -> Dict[str, Any]:
        return {"sent": self.sent, "errors": self.errors, "by_path": dict(self.by_path),
                "seconds": round(self.elapsed_s, 2)}


def parse_url(url: str) -> SplitResult:
    """The URL split, or OtelGilError for anything but http(s)://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OtelGilError(f"not an http URL: {url!r}", "give e.g. --url http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise OtelGilError(f"bad port in {url!r}", "give e.g. --url http://127.0.0.1:8000") \
            from None
    return parts


def _connect(url: SplitResult) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return cls(url.hostname or "", url.port, timeout=10)  # parse_url checked the host


def _get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()  # keep-alive: the body must be consumed before the next request
    return response.status


def _client(url: SplitResult, offset: int, stats: LoadStats, stop: threading.Event) -> None:
    conn = _connect(url)
    for path in itertools.islice(itertools.cycle(MIX), offset, None):
        if stop.is_set():
            break
        try:
            status = _get(conn, url.path.rstrip("/") + path)
            if status == 200:
                stats.ok(path)
            else:
                stats.failed(f"{path}: HTTP {status}")
        except (OSError, http.client.HTTPException) as exc:
            stats.failed(f"{path}: {exc or type(exc).__name__}")
            conn.close()
            conn = _connect(url)
            stop.wait(0.2)
    conn.close()


def check_reachable(url: SplitResult) -> None:
    conn = _connect(url)
    try:
        status = _get(conn, url.path.rstrip("/") + "/healthz")
    except (OSError, http.client.HTTPException) as exc:
        raise OtelGilError(f"cannot reach {url.geturl()}: {exc}",
                           "start the demo app there first: python examples/demo_app.py") \
            from None
    finally:
        conn.close()
    if status != 200:
        raise OtelGilError(f"{url.geturl()}/healthz answered HTTP {status}",
                           "point --url at examples/demo_app.py")


def load(url: str, duration: float, clients: int = CLIENTS) -> LoadStats:
    """GET MIX from `clients` keep-alive connections for `duration` seconds (0:
    until SIGINT/SIGTERM), with a progress line every second."""
    parts = parse_url(url)
    check_reachable(parts)
    stats, stop = LoadStats(), threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = [threading.Thread(target=_client, args=(parts, i, stats, stop),
                                name=f"load-{i}", daemon=True) for i in range(clients)]
    start = time.monotonic()
    try:
        for t in threads:
            t.start()
        elapsed = 0.0
        while not stop.wait(min(1.0, duration - elapsed) if duration else 1.0):
            elapsed = time.monotonic() - start
            total = f"/{duration:g}" if duration else ""
            say(f"load {elapsed:.0f}{total} s: {stats.line()}")
            if duration and elapsed >= duration:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        stats.elapsed_s = time.monotonic() - start
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stats


# ------------------------------------------------------------------- the demo app


def find_app() -> Path:
    """examples/demo_app.py of the repository this package runs from (an
    editable install), else of the current directory (the demo image)."""
    for root in (Path(otel_gil.__file__).resolve().parent.parent, Path.cwd()):
        if (root / APP).is_file():
            return root / APP
    raise OtelGilError(f"cannot find {APP}", "run from the otel-gil repository root")


class DemoApp:
    """examples/demo_app.py as a child process, and the sidecar it spawns."""

    def __init__(self, env: Dict[str, str]) -> None:
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(find_app()), "--host", "127.0.0.1", "--port", "0"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True)
        self.sidecar: Optional[int] = None

    def wait_ready(self, timeout: float) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while sel.select(max(0.0, deadline - time.monotonic())):
                line = self.proc.stdout.readline()
                if not line:
                    raise OtelGilError(f"the demo app exited ({self.proc.wait()}): "
                                       f"{self.last_error()}", "run examples/demo_app.py "
                                       "yourself to see its output")
                if line.startswith("{") and json.loads(line).get("ready"):
                    self.sidecar = _child_of(self.proc.pid)
                    return dict(json.loads(line))
        raise OtelGilError(f"the demo app was not ready after {timeout:.0f} s",
                           "see `otel-gil doctor`")

    def last_error(self) -> str:
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def stop(self, timeout: float = 15.0) -> str:
        """SIGTERM the app (it flushes its spans), then wait for its sidecar,
        which flushes and exits once the app is gone. Returns their stderr's
        last line (the sidecar inherits the app's stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + timeout
        while self.sidecar and _alive(self.sidecar) and time.monotonic() < deadline:
            time.sleep(0.05)
        last = self.last_error()
        self._stderr.close()
        return last


def _child_of(pid: int) -> Optional[int]:
    """The app's one child (the spawned sidecar), from /proc/PID/task/*/children."""
    try:
        children = [int(c) for tid in os.listdir(f"/proc/{pid}/task")
                    for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        return None
    return children[0] if len(children) == 1 else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------- the run


def endpoint_configured() -> Optional[str]:
    env = os.environ
    return env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def app_env(receiver_endpoint: Optional[str]) -> Dict[str, str]:
    """The app's environment; with the embedded receiver, pointed at it, with a
    spawned sidecar (not a node-wide one, whose spans would go elsewhere)."""
    env = dict(os.environ)
    if receiver_endpoint is not None:
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver_endpoint,
                   OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_INSECURE="true",
                   OTEL_PYTHON_GIL_MODE="spawn")
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "500")
        env.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "2000")
    return env


def run_app_under_load(env: Dict[str, str], duration: float) -> Tuple[LoadStats, str, bool]:
    """(load statistics, the app's and sidecar's last line on stderr, whether the
    sidecar was still running at the end of the load)"""
    say("starting examples/demo_app.py under otel-gil (compiling and attaching the probes)")
    app = DemoApp(env)
    try:
        ready = app.wait_ready(60)
        if not ready.get("traced"):
            raise OtelGilError(f"GIL tracing did not start in the demo app: {ready.get('status')}",
                               "run `otel-gil doctor` to see why")
        say(f"tracing live: demo app pid {ready['pid']} on port {ready['port']}, "
            f"sidecar pid {app.sidecar or '?'}")
        stats = load(f"http://127.0.0.1:{ready['port']}", duration)
        survived = app.sidecar is None or _alive(app.sidecar)
        say("collecting: stopping the app; waiting for its sidecar to flush the GIL spans")
    finally:
        last_words = app.stop()
    return stats, last_words, survived


def run(duration: float, output: str, slowest: int = 10) -> int:
    """The whole demo: app, load, result on stdout and in `output` (JSON)."""
    endpoint = endpoint_configured()
    if endpoint:
        say(f"OTEL_EXPORTER_OTLP_ENDPOINT is set: the app and its sidecar export to {endpoint}")
        stats, last_words, survived = run_app_under_load(app_env(None), duration)
        print(f"Sent {stats.line()}. The spans (request spans with gil.wait children) "
              f"and the sidecar's metrics went to {endpoint}.")
        _check(survived, True, last_words)
        return 0
    from otel_gil.receiver import OtlpReceiver  # noqa: PLC0415 - grpc only when needed

    with OtlpReceiver() as receiver:
        say(f"no OTEL_EXPORTER_OTLP_ENDPOINT: collecting on an embedded receiver "
            f"at {receiver.endpoint}")
        stats, last_words, survived = run_app_under_load(app_env(receiver.endpoint), duration)
        result = summarize(receiver.spans(), receiver.metrics(), stats, slowest)
    print(render(result))
    _write(output, result)
    print(f"\nMachine-readable result: {output}")
    _check(survived, bool(result["gil_spans"]["wait"]), last_words)
    return 0


def _check(survived: bool, got_waits: bool, last_words: str) -> None:
    """After the result is shown: a sidecar that died during the load, or no
    gil.wait span at all (the app is built to contend), means tracing broke."""
    if not survived:
        raise OtelGilError(f"the sidecar exited during the load; the app and its sidecar "
                           f"said last: {last_words}", "the result above is incomplete")
    if not got_waits:
        raise OtelGilError(f"no gil.wait span arrived; the app and its sidecar said last: "
                           f"{last_words}", "run `otel-gil doctor`")


def _write(path: str, result: Dict[str, Any]) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise OtelGilError(f"cannot write {path}: {exc.strerror}",
                           "choose a writable --output path") from None


# ---------------------------------------------------------------------- the result

SERVER = 2  # opentelemetry-proto trace.v1 Span.SpanKind.SPAN_KIND_SERVER


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def _wait_ns(span: Any) -> int:
    return int(span.attributes.get(names.WAIT_NS.name, span.end_ns - span.start_ns))


def _request_of(span: Any, by_id: Dict[str, Any]) -> Optional[Any]:
    """The nearest SERVER ancestor: the request the wait happened in."""
    parent = by_id.get(span.parent_span_id)
    for _ in range(64):  # a bound, against a malformed parent cycle
        if parent is None or parent.kind == SERVER:
            return parent
        parent = by_id.get(parent.parent_span_id)
    return None


def _request(req: Any, waits: Sequence[Any], by_id: Dict[str, Any],
             threads: Dict[str, str]) -> Dict[str, Any]:
    """One request with its GIL waits, the threads that held the GIL meanwhile
    and the spans (traces) they were in, each with how long it held."""
    holders: Dict[str, int] = {}
    linked: Dict[Tuple[str, str], int] = {}
    for w in waits:
        for name, held in zip(w.attributes.get(names.HOLDER_NAMES.name, []),
                              w.attributes.get(names.HOLDER_HELD_NS.name, [])):
            holders[name] = holders.get(name, 0) + held
        for trace_id, span_id, attrs in w.links:
            if attrs.get(names.LINK_ROLE.name) == "holder":
                key = (trace_id, span_id)
                linked[key] = linked.get(key, 0) + attrs.get(names.LINK_HELD_NS.name, 0)
    return {
        "name": req.name, "trace_id": req.trace_id, "span_id": req.span_id,
        "duration_ms": _ms(req.end_ns - req.start_ns),
        "gil_wait_ms": _ms(sum(_wait_ns(w) for w in waits)), "gil_waits": len(waits),
        "thread": waits[0].attributes.get(names.THREAD_NAME.name) if waits else None,
        "holders": [{"thread": n, "held_ms": _ms(ns)}
                    for n, ns in sorted(holders.items(), key=lambda kv: -kv[1])],
        "holder_spans": [{"trace_id": t, "span_id": s, "held_ms": _ms(ns),
                          "name": by_id[s].name if s in by_id else None,
                          "thread": threads.get(s)}
                         for (t, s), ns in sorted(linked.items(), key=lambda kv: -kv[1])],
    }


def _endpoints(requests: Sequence[Any], wait_ns: Dict[str, int]) -> List[Dict[str, Any]]:
    out = []
    for name in sorted({r.name for r in requests}):
        durations = [r.end_ns - r.start_ns for r in requests if r.name == name]
        waited = [wait_ns.get(r.span_id, 0) for r in requests if r.name == name]
        out.append({"name": name, "count": len(durations),
                    "mean_ms": _ms(sum(durations) / len(durations)), "max_ms": _ms(max(durations)),
                    "mean_gil_wait_ms": _ms(sum(waited) / len(waited))})
    return out


def summarize(spans: Sequence[Any], metrics: Sequence[Any], stats: LoadStats,
              slowest: int = 10) -> Dict[str, Any]:
    """The demo's result (out/demo.json) from the received spans and metric points."""
    by_id = {s.span_id: s for s in spans}
    requests = [s for s in spans if s.kind == SERVER]
    waits: Dict[str, List[Any]] = {}
    for span in spans:
        req = _request_of(span, by_id) if span.name == names.GIL_WAIT.name else None
        if req is not None:
            waits.setdefault(req.span_id, []).append(span)
    wait_ns = {sid: sum(_wait_ns(w) for w in ws) for sid, ws in waits.items()}
    # A span's thread, where a GIL span of that thread names it: that is how a
    # holder thread is matched with the span (trace) it was in.
    threads = {g.parent_span_id: g.attributes[names.THREAD_NAME.name] for g in spans
               if g.name in (names.GIL_WAIT.name, names.GIL_HOLD.name)}
    total_ns = sum(r.end_ns - r.start_ns for r in requests)
    top = sorted(requests, key=lambda r: r.start_ns - r.end_ns)[:slowest]
    return {
        "service": requests[0].resource.get("service.name") if requests else None,
        "load": stats.to_json(),
        "requests": {"total": len(requests), "with_gil_wait": len(waits),
                     "time_ms": _ms(total_ns), "gil_wait_ms": _ms(sum(wait_ns.values())),
                     "gil_wait_share": round(sum(wait_ns.values()) / total_ns, 4)
                     if total_ns else 0.0},
        "gil_spans": {"wait": sum(s.name == names.GIL_WAIT.name for s in spans),
                      "hold": sum(s.name == names.GIL_HOLD.name for s in spans)},
        "endpoints": _endpoints(requests, wait_ns),
        "slowest": [_request(r, waits.get(r.span_id, []), by_id, threads) for r in top],
        "metrics": summarize_metrics(metrics),
    }


def summarize_metrics(points: Sequence[Any]) -> List[Dict[str, Any]]:
    """Per otel-gil metric that arrived: the latest point of each series, added
    up over the series (threads). Sums are cumulative (the OTLP exporter's default
    temporality), so the latest point is the total."""
    latest: Dict[Tuple[str, str], Any] = {}
    for p in points:
        key = (p.name, json.dumps([p.attributes, p.resource], sort_keys=True, default=str))
        if key not in latest or p.time_ns >= latest[key].time_ns:
            latest[key] = p
    out = []
    for metric in names.METRICS:
        series = [p for (name, _), p in latest.items() if name == metric.name]
        if not series:
            continue
        entry: Dict[str, Any] = {"name": metric.name, "unit": metric.unit,
                                 "instrument": metric.instrument, "series": len(series)}
        if series[0].kind == "histogram":
            entry.update(count=sum(p.value["count"] for p in series),
                         sum=sum(p.value["sum"] for p in series),
                         max=max(p.value["max"] for p in series))
        elif metric.instrument == "gauge":  # a ratio per process: the highest
            entry["value"] = max(p.value for p in series)
        else:
            entry["value"] = sum(p.value for p in series)
        out.append(entry)
    return out


# ------------------------------------------------------------------- the terminal


def _metric_line(m: Dict[str, Any]) -> str:
    if "count" in m:  # a duration histogram, in seconds
        mean = m["sum"] / m["count"] if m["count"] else 0.0
        value = f"{m['count']} recorded, mean {mean * 1e3:.2f} ms, max {m['max'] * 1e3:.2f} ms"
    elif m["unit"] == "s":
        value = f"{m['value']:.3f} s"
    elif m["unit"] == "1":
        value = f"{m['value']:.3f}"
    else:
        value = f"{m['value']:.0f}"
    return f"  {m['name']:<28} {value}"


def _slow_lines(i: int, r: Dict[str, Any], holders: int = 3) -> List[str]:
    lines = [f"{i:>3}. {r['name']:<12} {r['duration_ms']:6.1f} ms, of which {r['gil_wait_ms']:.1f} "
             f"ms waiting for the GIL ({r['gil_waits']} waits)   trace {r['trace_id']}"]
    for h in r["holders"][:holders]:
        spans = [s for s in r["holder_spans"] if s["thread"] == h["thread"]]
        where = f"   in {spans[0]['name']} trace {spans[0]['trace_id']}" if spans else ""
        more = f" (+{len(spans) - 1} more)" if len(spans) > 1 else ""
        lines.append(f"       {h['thread']:<34} held it {h['held_ms']:5.1f} ms{where}{more}")
    rest = r["holders"][holders:]
    if rest:
        lines.append(f"       +{len(rest)} more holder{'s' if len(rest) > 1 else ''}, "
                     f"{sum(h['held_ms'] for h in rest):.1f} ms")
    return lines


def render(result: Dict[str, Any]) -> str:
    req, load_ = result["requests"], result["load"]
    out = [f"\nGIL contention in {result['service'] or 'the demo app'}: "
           f"{load_['seconds']:.1f} s of load, {load_['sent']} requests sent, "
           f"{load_['errors']} errors",
           f"  {req['total']} request spans received; {req['with_gil_wait']} of them waited "
           f"for the GIL (waits over the 1 ms threshold)",
           f"  {req['gil_wait_share']:.1%} of request time was spent waiting for the GIL "
           f"({req['gil_wait_ms'] / 1e3:.2f} s of {req['time_ms'] / 1e3:.2f} s)", "",
           f"  {'endpoint':<12} {'requests':>8} {'mean':>10} {'max':>10} {'mean GIL wait':>14}"]
    out += [f"  {e['name']:<12} {e['count']:>8} {e['mean_ms']:>7.1f} ms {e['max_ms']:>7.1f} ms "
            f"{e['mean_gil_wait_ms']:>11.1f} ms" for e in result["endpoints"]]
    out += ["", f"Slowest {len(result['slowest'])} requests; who held the GIL while each "
                "waited, and in which trace:"]
    for i, r in enumerate(result["slowest"], 1):
        out += _slow_lines(i, r)
    out += ["", "Sidecar metrics (OTLP):" if result["metrics"] else "no metrics received"]
    out += [_metric_line(m) for m in result["metrics"]]
    return "\n".join(out)
