"""What otel-gil's BPF programs themselves cost: runs and ns per run, from the kernel.

    .venv/bin/python bench/programs.py [--python PY] [--seconds S]
                                       [--workloads http,zlib4] [--setups contended,all]

The throughput ratios (paired.py) mix three costs: the uprobe traps, the
programs' own run time, and what that run time costs the app when a program
runs inside gil->mutex's critical section (the wait programs do). This
measures the second one exactly: with kernel.bpf_stats_enabled the kernel
counts every program's runs and run time (run_cnt, run_time_ns in the
program's fdinfo). Each setup traces its own child of the workload for S
seconds of load, its session stepping as in the sidecar; the table gives, per
program, runs per second, runs per unit of work, ns per run and ns per unit.
The counting itself adds two clock reads per run (~0.1 µs here): the figures
are upper bounds. bpf_stats_enabled is restored afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from typing import Dict, List, Tuple

from compare import PROBE_SETUPS, WORKLOADS, Workload

from otel_gil.probes.session import Session
from otel_gil.target import process

STATS = "/proc/sys/kernel/bpf_stats_enabled"
Counts = Dict[str, Tuple[int, int]]  # program -> (run_time_ns, run_cnt)


def program_counts(session: Session) -> Counts:
    """Every loaded program's kernel counters, by function name."""
    out: Counts = {}
    for name, fn in session.probes._bpf.funcs.items():  # noqa: SLF001 (bench only)
        with open(f"/proc/self/fdinfo/{fn.fd}") as f:
            fields = dict(re.findall(r"(\w+):\s+(\d+)", f.read()))
        label = name.decode() if isinstance(name, bytes) else str(name)
        out[label.replace("tracepoint__sched__", "")] = (int(fields.get("run_time_ns", 0)),
                                                         int(fields.get("run_cnt", 0)))
    return out


def measure(kind: str, python: List[str], setup: str, seconds: float) -> Tuple[float, Counts]:
    """(the child's rate, each program's (ns, runs) during S seconds of load)."""
    work = Workload(kind, python)
    try:
        session = Session(PROBE_SETUPS[setup], lambda _iv: None)
    except BaseException:
        work.close()
        raise
    done = threading.Event()

    def follow() -> None:
        while not done.is_set():
            session.step(10)

    stepper = threading.Thread(target=follow, daemon=True)
    try:
        process.inspect_process(work.pid)
        work.batch(0.5)  # warm up
        session.add(work.pid)
        stepper.start()
        before = program_counts(session)
        rate = work.batch(seconds)
        after = program_counts(session)
        return rate, {p: (after[p][0] - before[p][0], after[p][1] - before[p][1])
                      for p in after}
    finally:
        done.set()
        if stepper.is_alive():
            stepper.join()
        session.close()
        work.close()


def table(rows: List[Tuple[str, str, float, Counts]], seconds: float, python: str) -> str:
    lines = [f"BPF programs' own run time (kernel.bpf_stats_enabled), {seconds:g} s of "
             f"load per row; {python}", "",
             "| workload | set | rate/s | program | runs/s | runs per unit | ns/run | "
             "ns per unit |", "|---|---|---|---|---|---|---|---|"]
    for kind, setup, rate, counts in rows:
        units = rate * seconds
        for prog, (ns, runs) in sorted(counts.items()):
            if runs:
                lines.append(f"| {kind} | {setup} | {rate:,.0f} | {prog} | {runs / seconds:,.0f}"
                             f" | {runs / units:.3f} | {ns / runs:,.0f} | {ns / units:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workloads", default="http,zlib4,hashlib,cpu4")
    parser.add_argument("--setups", default="contended,all")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("programs.py: run as root (eBPF)", file=sys.stderr)
        return 2
    setups, kinds = args.setups.split(","), args.workloads.split(",")
    unknown = [s for s in setups if s not in PROBE_SETUPS] + [k for k in kinds
                                                               if k not in WORKLOADS]
    why = (f"unknown setup or workload: {', '.join(unknown)} (setups: "
           f"{', '.join(PROBE_SETUPS)}; workloads: {', '.join(WORKLOADS)})" if unknown else
           "--seconds: more than 0 s of load" if not args.seconds > 0 else None)
    if why:
        print(f"programs.py: {why}", file=sys.stderr)
        return 2
    with open(STATS) as f:
        was = f.read().strip()
    rows = []
    try:
        with open(STATS, "w") as f:
            f.write("1")
        for kind in kinds:
            for setup in setups:
                rate, counts = measure(kind, args.python.split(), setup, args.seconds)
                rows.append((kind, setup, rate, counts))
    finally:
        with open(STATS, "w") as f:
            f.write(was)
    print(table(rows, args.seconds, args.python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
