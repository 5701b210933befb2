"""Apps that fork, for tests/test_prefork.py. One JSON line per process on stdout.

    python prefork_app.py timing   children forked before the agent ran, while the
                                   sidecar started, and once it was live; grandchildren
    python prefork_app.py storm    100 short-lived children in a row, then the parent works
    python prefork_app.py orphan   the app daemonizes (double fork), the daemon is traced
    opentelemetry-instrument python prefork_app.py mp
                                   multiprocessing, fork and forkserver, no otel-gil code

Each traced process runs two threads that burn bytecode inside spans named
LABEL-N, so they hand the GIL to each other and wait for it (gil.wait spans).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Dict, List

from opentelemetry import trace

tracer = trace.get_tracer("prefork-app")


def setup_sdk() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "prefork-app"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(300))


def contend(label: str, seconds: float = 1.0) -> None:
    def spin(i: int) -> None:
        with tracer.start_as_current_span(f"{label}-{i}"):
            burn(seconds)

    threads = [threading.Thread(target=spin, args=(i,), name=f"{label}-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def flush() -> None:
    # A forked child leaves by os._exit(): no atexit, so flush the app's spans.
    getattr(trace.get_tracer_provider(), "force_flush", lambda: None)()


def say(**fields: Any) -> None:
    print(json.dumps(dict(fields, pid=os.getpid())), flush=True)


def traced_child(label: str, grandchild: bool = False) -> None:
    """Runs in a forked child: work, report, leave."""
    import otel_gil

    live_at_fork = otel_gil.wait_until_live(0)  # fork returned without waiting for tracing
    live = otel_gil.wait_until_live(60)
    grandchild_pid = fork(traced_child, f"{label}-grandchild") if grandchild else 0
    contend(label)
    flush()
    if grandchild_pid:
        os.waitpid(grandchild_pid, 0)
    say(child=label, live_at_fork=live_at_fork, live=live, status=otel_gil.status(),
        ppid=os.getppid())
    os._exit(0)


def fork(target: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        finally:
            os._exit(1)
    return pid


def has_child() -> bool:
    me = os.getpid()
    for tid in os.listdir(f"/proc/{me}/task"):
        with open(f"/proc/{me}/task/{tid}/children") as f:
            if f.read().split():
                return True
    return False


def timing() -> None:
    import otel_gil

    setup_sdk()
    otel_gil.instrument()
    pids = {"before": fork(traced_child, "before", True)}  # the agent may not have run yet
    while not has_child():  # the sidecar process exists: it is starting, not listening yet
        time.sleep(0.001)
    pids["starting"] = fork(traced_child, "starting")
    live = otel_gil.wait_until_live(60)
    pids["after"] = fork(traced_child, "after", True)
    for pid in pids.values():
        os.waitpid(pid, 0)
    say(parent=True, live=live, children=pids)


def short_lived(i: int) -> None:
    # Most exit at once or within ms; every 10th lives long enough to be attached
    # to (or to exit while it is).
    time.sleep(0.3 if i % 10 == 9 else 0.001 * (i % 3))
    os._exit(0)


def storm() -> None:
    import otel_gil

    setup_sdk()
    otel_gil.instrument()
    live = otel_gil.wait_until_live(60)
    sidecar = otel_gil._agent.sidecar.pid
    with tracer.start_as_current_span("storm"):
        for i in range(100):
            os.waitpid(fork(short_lived, i), 0)
    contend("after-storm")
    flush()
    say(parent=True, live=live, still_live=otel_gil.wait_until_live(0),
        status=otel_gil.status(), sidecar=sidecar, sidecar_alive=os.path.exists(f"/proc/{sidecar}"))


def orphan() -> None:
    """Daemonize as gunicorn --daemon does (gunicorn/util.py, daemonize): fork,
    the parent exits at once; fork again, the middle one exits at once."""
    import otel_gil

    setup_sdk()
    otel_gil.instrument()
    live = otel_gil.wait_until_live(60)
    sidecar = otel_gil._agent.sidecar.pid
    flush()
    say(parent=True, live=live, sidecar=sidecar)
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    live = otel_gil.wait_until_live(60)
    contend("daemon")
    flush()
    say(child="daemon", live=live, status=otel_gil.status(), ppid=os.getppid())
    os._exit(0)


def mp_work(method: str, queue: Any) -> None:
    import otel_gil

    live = otel_gil.wait_until_live(60)
    contend(method)
    flush()
    queue.put({"method": method, "pid": os.getpid(), "ppid": os.getppid(), "live": live,
               "status": otel_gil.status()})


def sidecars_of(root: int) -> List[int]:
    """otel-gil sidecars among root's descendants."""
    parents: Dict[int, int] = {}
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"\0sidecar\0--owner-fd" in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return [pid for pid in found if descends(pid)]


def mp() -> None:
    results = []
    for method in ("fork", "forkserver"):
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        procs = [ctx.Process(target=mp_work, args=(method, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results += [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
    say(parent=True, children=results, sidecars=sidecars_of(os.getpid()))


if __name__ == "__main__":
    {"timing": timing, "storm": storm, "orphan": orphan, "mp": mp}[sys.argv[1]]()
