"""Cost of keeping the context slot right across event-loop steps
(otel_gil/app/event_loop.py), next to bench/context_switch.py's attach/detach figure.

steps: CPU ns per task step of tasks that only ``await asyncio.sleep(0)`` (one
step each: Handle._run on asyncio, a wrapped call_soon callback on uvloop),
inside a recording SDK span, with and without otel_gil.context.install();
interleaved repetitions, the minimum of each kept (noise only adds time).

http: a small asyncio HTTP/1.1 keep-alive server (a child process, each
request in a span), plain, with the attach/detach hook only, and hooked (hook
and loop patches), loaded from another child process over 8 loopback
connections for a few seconds per run, runs interleaved: requests per second
(best run kept) and the server's CPU time per request (utime + stime over the
requests it served; least kept), which a noisy host disturbs less.

    .venv/bin/python bench/event_loop.py steps [--loop asyncio|uvloop] [-n 200000] [-r 7]
    .venv/bin/python bench/event_loop.py http [--loop asyncio|uvloop] [--seconds 3] [-r 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otel_gil.app import context as otel_gil_context

TASKS = 10


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


async def spin(steps: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


def run_steps(kind: str, steps: int, tracer: trace.Tracer) -> float:
    """ns per step: TASKS tasks, steps/TASKS sleeps each, inside a span."""
    loop = new_loop(kind)  # made while (un)hooked, as an app's would be

    async def main() -> None:
        with tracer.start_as_current_span("bench"):
            await asyncio.gather(*(spin(steps // TASKS) for _ in range(TASKS)))

    # The thread's CPU time, not wall time: on a shared machine, time spent
    # descheduled would otherwise land on whichever variant was running.
    start = time.thread_time_ns()
    loop.run_until_complete(main())
    elapsed = time.thread_time_ns() - start
    loop.close()
    return elapsed / steps


def measure_steps(kind: str, steps: int, repeats: int) -> Dict[bool, float]:
    tracer = TracerProvider().get_tracer("bench")
    run_steps(kind, steps // 10, tracer)  # warm up
    samples: Dict[bool, List[float]] = {False: [], True: []}
    for _ in range(repeats):
        for hooked in (False, True):  # interleaved
            if hooked:
                otel_gil_context.install()
            else:
                otel_gil_context.uninstall()
            samples[hooked].append(run_steps(kind, steps, tracer))
    otel_gil_context.uninstall()
    return {hooked: min(values) for hooked, values in samples.items()}


# ---------------------------------------------------------------------- http

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"

def serve(kind: str, port: int, mode: str) -> None:
    """The server child: one request per read (the client sends one, waits for
    the reply, then sends the next), each in a span of its own. mode: plain
    (nothing), attach (the attach/detach hook only: otel-gil before the loop
    patches), hooked (both)."""
    tracer = TracerProvider().get_tracer("bench")
    if mode != "plain":
        otel_gil_context.install()
    if mode == "attach":
        from otel_gil.app import event_loop  # noqa: PLC0415

        event_loop.uninstall()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            with tracer.start_as_current_span("request"):
                writer.write(RESPONSE)
                await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    loop = new_loop(kind)
    try:
        loop.run_until_complete(main())
    except (asyncio.IncompleteReadError, KeyboardInterrupt):
        pass


async def _client(port: int, until: float, counts: List[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    done = 0
    while time.monotonic() < until:
        writer.write(request)
        await reader.readexactly(len(RESPONSE))
        done += 1
    counts.append(done)
    writer.close()


def load(port: int, seconds: float, connections: int = 8) -> Tuple[int, float]:
    """Requests made over `connections` keep-alive connections, and the seconds taken."""
    counts: List[int] = []

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(port, until, counts) for _ in range(connections)))

    start = time.monotonic()
    asyncio.run(main())
    return sum(counts), time.monotonic() - start


def cpu_s(pid: int) -> float:
    """utime + stime of process pid, in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_run(kind: str, mode: str, seconds: float) -> Tuple[float, float]:
    """(requests per second, server CPU µs per request) of one run."""
    port = _free_port()
    me = os.path.abspath(__file__)
    server = subprocess.Popen([sys.executable, me, "_serve", kind, str(port), mode],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        cpu0 = cpu_s(server.pid)
        client = subprocess.run([sys.executable, me, "_load", str(port), str(seconds)],
                                capture_output=True, text=True, check=True)
        cpu = cpu_s(server.pid) - cpu0
        requests, elapsed = (float(x) for x in client.stdout.split())
        return requests / elapsed, 1e6 * cpu / max(requests, 1.0)
    finally:
        server.kill()
        server.wait()


MODES = ("plain", "attach", "hooked")


def measure_http(kind: str, seconds: float, repeats: int
                 ) -> Dict[str, List[Tuple[float, float]]]:
    results: Dict[str, List[Tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:  # interleaved
            results[mode].append(http_run(kind, mode, seconds))
    return results


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    steps = sub.add_parser("steps")
    steps.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    steps.add_argument("-n", type=int, default=200_000, help="steps per repetition")
    steps.add_argument("-r", type=int, default=7, help="repetitions per variant")
    http = sub.add_parser("http")
    http.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    http.add_argument("--seconds", type=float, default=3.0)
    http.add_argument("-r", type=int, default=3)
    loader = sub.add_parser("_load")  # the load generator's own process
    loader.add_argument("port", type=int)
    loader.add_argument("seconds", type=float)
    server = sub.add_parser("_serve")  # the server's own process
    server.add_argument("kind")
    server.add_argument("port", type=int)
    server.add_argument("mode", choices=MODES)
    args = parser.parse_args(argv)
    if args.what == "_load":
        requests, elapsed = load(args.port, args.seconds)
        print(requests, elapsed)
        return
    if args.what == "_serve":
        serve(args.kind, args.port, args.mode)
        return
    print(f"python {sys.version.split()[0]}, loop {args.loop}")
    if args.what == "steps":
        r = measure_steps(args.loop, args.n, args.r)
        print(f"task step              plain {r[False]:7.1f} ns  hooked {r[True]:7.1f} ns  "
              f"added {r[True] - r[False]:6.1f} ns  ratio {r[True] / r[False]:.2f}")
    else:
        h = measure_http(args.loop, args.seconds, args.r)
        rps = {mode: max(r for r, _ in runs) for mode, runs in h.items()}
        cpu = {mode: min(c for _, c in runs) for mode, runs in h.items()}
        for mode in MODES:
            print(f"http {mode:7s} req/s best {rps[mode]:7.0f}  runs " +
                  " ".join(f"{r:7.0f}" for r, _ in h[mode]) +
                  f"   server CPU/request least {cpu[mode]:6.1f} µs  runs " +
                  " ".join(f"{c:6.1f}" for _, c in h[mode]))
        for mode in MODES[1:]:
            print(f"http {mode:7s} vs plain: req/s {100 * (rps[mode] / rps['plain'] - 1):+.1f}%"
                  f"  CPU/request {cpu[mode] - cpu['plain']:+.1f} µs")
        print(f"http hooked vs attach (the loop patches alone): req/s "
              f"{100 * (rps['hooked'] / rps['attach'] - 1):+.1f}%  CPU/request "
              f"{cpu['hooked'] - cpu['attach']:+.1f} µs "
              f"({100 * (cpu['hooked'] / cpu['attach'] - 1):+.1f}%)")

if __name__ == "__main__":
    main()
