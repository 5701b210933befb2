"""Throughput under otel-gil's two probe sets and the tools people use instead.

    .venv/bin/python bench/compare.py [--python PY] [--rounds R] [--seconds T]
                                      [--workloads hashlib,cpu4,zlib4,http]
                                      [--setups none,contended,nostacks,all,floor,gilknocker,pyspy]

Each workload runs in one child of PY (default: this interpreter) for the
whole run; every round runs one batch of T seconds per setup, the order
rotated each round, so that no setup always follows the same one:

  none        nothing attached
  contended   otel-gil --probes contended, with a session consuming its events
  nostacks    the same with holder stacks off (--stack-threshold-ms 0): no
              sched_switch or CPU-sample program, what those cost
  all         otel-gil --probes all, likewise
  floor       the contended uprobes running empty programs, no stack programs
              (not run unless asked for): what the traps alone cost
  gilknocker  gilknocker.KnockKnock polling every 1 ms inside the child
  pyspy       py-spy record --gil at 100 Hz attached to the child

Workloads (the unit is what the child counts):

  hashlib  one thread, hashlib.sha1 of 2 KiB (each call drops and re-takes the GIL)
  cpu4     4 CPU-bound Python threads
  zlib4    4 threads of zlib.compress(4 KiB) plus a little Python each
  http     a ThreadingHTTPServer (TCP_NODELAY, keep-alive) in the child, loaded
           by 8 keep-alive client threads in another process, requests/s

Reported: throughput relative to `none` per workload and setup, from the best
round of each (noise on a shared machine only ever slows a batch down), with
the median of the per-round ratios beside it, as a Markdown table ready for
bench/README.md. Also, per workload, the traced child's CPU time per unit
(utime + stime of every thread of the child over the batch, the least round):
probe traps and BPF programs run on the traced threads, and gilknocker's
poller in the child, so this is their cost to the app, and the host's noise,
which moves the rate by ±15% here, disturbs it less. And the tool's own CPU
beside the app, as a share of one core (median of the batches): the session
(this process, which consumes the events as the sidecar would) or py-spy's
process. Only ratios within one run mean anything; run it on a quiet machine
(the numbers in bench/README.md say how they were taken).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from otel_gil import trust
from otel_gil.cli.stack_options import stack_settings
from otel_gil.probes import loader
from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.session import Session
from otel_gil.target import process

CHILD = r"""
import hashlib, json, os, socket, sys, threading, time, zlib

KIND = sys.argv[1]
knocker = None


def hashlib_batch(seconds):
    data, n, end = b"x" * 2048, 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            hashlib.sha1(data)
        n += 1000
    return n


def threads_batch(seconds, work):
    counts, end = [0] * 4, time.perf_counter() + seconds

    def run(i):
        n = 0
        while time.perf_counter() < end:
            work()
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts)


def cpu():
    sum(i * i for i in range(200))


payload = bytes(range(256)) * 8 + os.urandom(2048)  # 4 KiB, half compressible


def zlib_work():
    zlib.compress(payload, 6)
    sum(i * i for i in range(50))


def serve():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self):
            body = json.dumps({"n": sum(i * i for i in range(300))}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


port = serve() if KIND == "http" else 0
print(json.dumps({"pid": os.getpid(), "port": port}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "knock":
        if cmd[1] == "on":
            from gilknocker import KnockKnock
            knocker = KnockKnock(polling_interval_micros=1000)
            knocker.start()
        elif knocker is not None:
            knocker.stop()
            knocker = None
        print(json.dumps({"ok": True}), flush=True)
    elif cmd[0] == "cpu":
        t = os.times()
        print(json.dumps({"cpu": t.user + t.system}), flush=True)
    elif cmd[0] == "run":
        seconds = float(cmd[1])
        t0 = time.perf_counter()
        if KIND == "hashlib":
            n = hashlib_batch(seconds)
        elif KIND == "cpu4":
            n = threads_batch(seconds, cpu)
        elif KIND == "zlib4":
            n = threads_batch(seconds, zlib_work)
        else:
            n = 0
        print(json.dumps({"ops": n, "s": time.perf_counter() - t0}), flush=True)
"""

CLIENT = r"""
import http.client, json, sys, threading, time
port = int(sys.argv[1])
conns = 8
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    seconds = float(line.split()[1])
    counts, end = [0] * conns, time.perf_counter() + seconds

    def run(i):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        while time.perf_counter() < end:
            c.request("GET", "/")
            c.getresponse().read()
            n += 1
        c.close()
        counts[i] = n

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"ops": sum(counts), "s": time.perf_counter() - t0}), flush=True)
"""

WORKLOADS = {
    "hashlib": "one thread, `hashlib.sha1(2 KiB)` loop",
    "cpu4": "4 CPU-bound Python threads",
    "zlib4": "4 threads, `zlib.compress(4 KiB)` + Python work",
    "http": "ThreadingHTTPServer (TCP_NODELAY), 8 keep-alive clients in another process",
}
SETUPS = ("none", "contended", "nostacks", "all", "gilknocker", "pyspy")
PROBE_SETUPS = {"contended": ProbeConfig(probes="contended"),
                # as the CLI's --stack-threshold-ms 0 has it: no stack programs
                # (a ProbeConfig threshold of 0 would take a stack at every sample)
                "nostacks": ProbeConfig(probes="contended", **stack_settings(0)),
                "all": ProbeConfig(probes="all"),
                # the contended uprobes running empty programs, no stack programs:
                # what the traps alone cost (not in the default setups)
                "floor": ProbeConfig(probes="contended", empty=True, stacks=False)}
LABELS = {"none": "untraced", "contended": "otel-gil --probes contended",
          "nostacks": "contended, --stack-threshold-ms 0",
          "all": "otel-gil --probes all", "floor": "contended uprobes, empty programs",
          "gilknocker": "gilknocker (1 ms poll)",
          "pyspy": "py-spy record --gil (100 Hz)",
          "baseline": "contended, --baseline-bpf's program"}


APP_CPU: Dict[str, Dict[str, List[float]]] = {}  # workload -> setup -> the child's s per op
TOOL_CPU: Dict[str, Dict[str, List[float]]] = {}  # workload -> setup -> the tool's cores


class Proc:
    """A child speaking one JSON line per command."""

    def __init__(self, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=env)
        self.hello = self.ask(None)

    def ask(self, line: Optional[str]) -> Dict[str, float]:
        assert self.popen.stdin and self.popen.stdout
        if line is not None:
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
        reply = self.popen.stdout.readline()
        if not reply:
            raise RuntimeError(f"{self.popen.args[:3]} exited ({self.popen.wait()})")
        return dict(json.loads(reply))

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait()


def gilknocker_path() -> Optional[str]:
    """Where this interpreter's gilknocker lives (the bench extra), for the child."""
    try:
        import gilknocker  # noqa: PLC0415
    except ImportError:
        return None
    return os.path.dirname(os.path.dirname(gilknocker.__file__))


class Workload:
    """One workload's traced child (and its load client), and how to run a batch."""

    def __init__(self, kind: str, python: List[str]) -> None:
        env = dict(os.environ)
        path = gilknocker_path()
        if path:
            env["PYTHONPATH"] = path
        self.kind = kind
        self.child = Proc(python + ["-c", CHILD, kind], env)
        self.cpu_per_op: List[float] = []  # the child's CPU s per unit, per batch
        self.pid = int(self.child.hello["pid"])
        self.client = Proc([sys.executable, "-c", CLIENT, str(int(self.child.hello["port"]))]) \
            if kind == "http" else None

    def batch(self, seconds: float) -> float:
        driver = self.client or self.child
        before = self.child.ask("cpu")["cpu"]
        reply = driver.ask(f"run {seconds}")
        # nan: nothing done, no figure (never the previous batch's)
        spent = self.child.ask("cpu")["cpu"] - before
        self.cpu_per_op.append(spent / reply["ops"] if reply["ops"] else math.nan)
        return reply["ops"] / reply["s"]

    def close(self) -> None:
        for p in (self.client, self.child):
            if p is not None:
                p.close()


def with_session(session: Session, work: Workload, run: Callable[[], float]) -> float:
    """A batch under otel-gil: probes attached, the session stepping as `record`
    does (one compiled program per set for the whole run)."""
    try:
        session.add(work.pid)
        done = threading.Event()

        def follow() -> None:
            while not done.is_set():
                session.step(50)

        stepper = threading.Thread(target=follow, daemon=True)
        stepper.start()
        try:
            return run()
        finally:
            done.set()
            stepper.join()  # (its last step is in the tool's figure, not add or forget)
    finally:
        session.forget(work.pid)


def with_pyspy(work: Workload, run: Callable[[], float]) -> float:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    spy = subprocess.Popen([exe, "record", "--gil", "--rate", "100", "--pid", str(work.pid),
                            "--output", os.devnull, "--format", "raw"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert spy.stdout is not None
    if not spy.stdout.readline():  # "py-spy> Sampling process ..." once attached
        raise RuntimeError(f"py-spy could not attach to pid {work.pid} ({spy.wait()})")
    try:
        return run()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def tool_cpu_s() -> float:
    """CPU s of this process (the sessions) and of its waited-for children (py-spy)."""
    own = os.times()
    return own.user + own.system + own.children_user + own.children_system


def timed_tool(run: Callable[[], float], tool: List[float]) -> float:
    """run(), appending the tool's CPU over it to `tool`, in cores."""
    t0, c0 = time.monotonic(), tool_cpu_s()
    try:
        return run()
    finally:
        tool.append((tool_cpu_s() - c0) / (time.monotonic() - t0))


def one_batch(setup: str, work: Workload, seconds: float, sessions: Dict[str, Session],
              tool: List[float]) -> float:
    """One batch; appends the tool's own CPU over it (cores) to `tool`."""
    def run() -> float:
        return work.batch(seconds)

    if setup in sessions:  # the session's CPU while the batch runs, not its add or forget
        return with_session(sessions[setup], work, lambda: timed_tool(run, tool))
    if setup == "gilknocker":  # its poller runs in the child: in the app's CPU
        work.child.ask("knock on")
        try:
            return timed_tool(run, tool)
        finally:
            work.child.ask("knock off")
    if setup == "pyspy":  # py-spy's CPU is known once it exited, attach included
        wall: List[float] = []
        c0 = tool_cpu_s()
        rate = with_pyspy(work, lambda: timed_tool(run, wall))
        tool.append((tool_cpu_s() - c0) / seconds)
        return rate
    return timed_tool(run, tool)


def table(results: Dict[str, Dict[str, List[float]]], setups: List[str], python: str) -> str:
    lines = [f"Throughput relative to untraced, best round (median of per-round ratios); "
             f"{python}", "",
             "| workload | " + " | ".join(LABELS[s] for s in setups if s != "none") + " |",
             "|---" * len(setups) + "|"]
    for kind, per in results.items():
        base = per["none"]
        cells = []
        for s in setups:
            if s == "none":
                continue
            best = max(per[s]) / max(base)
            med = statistics.median(x / y for x, y in zip(per[s], base))
            cells.append(f"{best:.3f} ({med:.3f})")
        lines.append(f"| {WORKLOADS[kind]} | " + " | ".join(cells) + " |")
    for kind, cpu in APP_CPU.items():
        least = {s: min(x for x in v if x == x) * 1e6 for s, v in cpu.items()
                 if any(x == x for x in v)}
        unit = "request" if kind == "http" else "unit"
        lines += ["", f"{kind}: the traced app's CPU per {unit}, least round: " + ", ".join(
            f"{s} {least[s]:.2f} µs" + ("" if s == "none" else f" ({least[s] / least['none']:.3f})")
            for s in setups if s in least)]
        tool = TOOL_CPU.get(kind, {})
        lines.append(f"{kind}: the tool's own CPU beside the app, median: " + ", ".join(
            f"{s} {100 * statistics.median(tool[s]):.1f}% of a core"
            for s in setups if s in tool))
    lines.append("")
    lines.append("untraced throughput (best round): " + ", ".join(
        f"{kind} {max(per['none']):,.0f}/s" for kind, per in results.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the workloads (a command: 'chroot DIR /usr/bin/"
                             "python3.14' works)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--json", default=None, help="also write every batch's figures here")
    parser.add_argument("--baseline-bpf", default=None, metavar="DIR",
                        help="add a setup 'baseline': the contended set compiled from DIR's "
                             "gil.bpf.c and gil.h (e.g. an older commit's bpf/, from git worktree)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("compare.py: run as root (eBPF)", file=sys.stderr)
        return 2
    python = args.python.split()
    setups = ["none"] + [s for s in args.setups.split(",") if s != "none"]
    if args.baseline_bpf:
        why = baseline_refusal(Path(args.baseline_bpf))
        if why:
            print(f"compare.py: --baseline-bpf: {why}", file=sys.stderr)
            return 2
    sessions = {s: Session(config, lambda _iv: None)
                for s, config in PROBE_SETUPS.items() if s in setups}
    if args.baseline_bpf:
        sessions["baseline"] = baseline_session(Path(args.baseline_bpf))
        setups.insert(1, "baseline")
    results: Dict[str, Dict[str, List[float]]] = {}
    try:
        for kind in args.workloads.split(","):
            results[kind] = run_workload(kind, python, setups, args, sessions)
    finally:
        for session in sessions.values():
            session.close()
    print(table(results, setups, args.python))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": args.python, "seconds": args.seconds, "results": results,
                       "app_cpu_s_per_unit": APP_CPU, "tool_cpu_cores": TOOL_CPU}, f,
                      indent=1)
    return 0


def baseline_refusal(src: Path) -> Optional[str]:
    """Why another tree's BPF source must not be compiled as root, or None.
    Like the sidecar's own bpf/, it must be root's and writable by no one else."""
    if not (src / "gil.bpf.c").is_file():
        return f"no gil.bpf.c in {src}"
    why = trust.trusted_tree_reason(str(src))
    return f"{why}: the program is compiled and loaded as root" if why else None


def baseline_session(src: Path) -> Session:
    """The contended set as another commit's program has it: an A/B in one run."""
    own = loader.bpf_dir
    loader.bpf_dir = lambda: src  # type: ignore[assignment]  # the compile reads it once
    try:
        return Session(ProbeConfig(probes="contended"), lambda _iv: None)
    finally:
        loader.bpf_dir = own  # type: ignore[assignment]


def run_workload(kind: str, python: List[str], setups: List[str], args: argparse.Namespace,
                 sessions: Dict[str, Session]) -> Dict[str, List[float]]:
    """R rounds of one batch per setup, the order rotated each round."""
    work = Workload(kind, python)
    try:
        process.inspect_process(work.pid)  # fill the caches before timing
        work.batch(min(1.0, args.seconds))  # warm up
        per: Dict[str, List[float]] = {s: [] for s in setups}
        for r in range(args.rounds):
            for s in setups[r % len(setups):] + setups[:r % len(setups)]:
                # the batch's ask/reply is in the tool's figure too: "none" shows how much
                per[s].append(one_batch(s, work, args.seconds, sessions,
                                        TOOL_CPU.setdefault(kind, {}).setdefault(s, [])))
                APP_CPU.setdefault(kind, {}).setdefault(s, []).append(work.cpu_per_op[-1])
            print(f"{kind} round {r + 1}: " + ", ".join(
                f"{s} {per[s][-1]:,.0f}/s" for s in setups), file=sys.stderr, flush=True)
        return per
    finally:
        work.close()


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    sys.exit(main())
