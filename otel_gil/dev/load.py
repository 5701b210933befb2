"""The demo's load generator: real HTTP requests from keep-alive clients, a mix
of CPU-bound and light ones (`otel-gil demo`, and alone with `--url`)."""

from __future__ import annotations

import http.client
import itertools
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict
from urllib.parse import SplitResult, urlsplit

from otel_gil.errors import OtelGilError


def say(message: str) -> None:
    """Progress: one line on stderr."""
    print(f"demo: {message}", file=sys.stderr, flush=True)


# About one /cpu request per three /light ones; each client starts at a
# different point of the cycle so that the kinds interleave.
MIX = ("/cpu", "/light", "/light", "/light")


CLIENTS = 6


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
