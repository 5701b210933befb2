"""Throughput ratios that hold on a noisy host: paired short slices.

    .venv/bin/python bench/paired.py [--python PY] [--cycles N] [--slice S]
                                     [--workloads http] [--setups none,control,contended,...]

compare.py runs one child per workload and attaches each tool for a batch of
seconds; on this shared KVM guest the untraced rate moves ±15-25% from one
batch to the next, more than the differences being measured. Here every setup
has a child of its own (and, for http, a load client of its own), all alive
for the whole run; otel-gil's probes stay attached to theirs throughout, the
other tools run during their child's slices:

  none, control  nothing attached (two children: `control` over `none` is the
                 method's own error, an A/A comparison)
  contended, all otel-gil's probe sets, a session per set consuming its events
                 (one stepping thread for every session, as the sidecar has)
  nostacks       contended without holder stacks (no sched_switch program)
  floor          the contended uprobes running empty programs: the traps alone
  wakeonly       floor without its wait-start trap (on_wait detached): what a
                 contended wait would save with one uprobe fewer
  futextp        wakeonly, plus an empty program on syscalls:sys_enter_futex
                 during this child's slices: the price of a tracepoint in the
                 removed trap's place (it slows every syscall of the machine)
  gilknocker     KnockKnock polling every 1 ms, switched on for its child's slices
  ticker         nothing attached, but a process beside the app waking every
                 1 ms, as gilknocker's poller does, during that child's slices
  pyspy          py-spy record --gil at 100 Hz, attached to its child before each
                 of that child's slices and stopped after it, as in compare.py
                 (paused instead, it would catch up on the samples it missed)

The load runs in slices of S seconds (default 0.2), one per setup in turn,
the order rotated every cycle, for N cycles. A cycle's ratio is a setup's rate
over `none`'s in the same cycle, a second or two apart, so the host's slow
drift cancels; the table gives the median over cycles with a 95% bootstrap
interval of that median, and likewise the ratio of the child's CPU per unit.
--ratios a/b,... adds the same medians of setup a over setup b, cycle by cycle.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import threading
from typing import Dict, List, Tuple

from compare import LABELS, PROBE_SETUPS, WORKLOADS, Workload, with_pyspy

from otel_gil.probes.session import Session
from otel_gil.target import process

SETUPS = ("none", "control", "contended", "nostacks", "floor", "all", "gilknocker", "pyspy",
          "ticker", "wakeonly", "futextp")
FLOOR_VARIANTS = ("wakeonly", "futextp")  # floor's probes, on_wait detached
LABELS = dict(LABELS, control="untraced, a second child (A/A)",
              ticker="untraced, a 1 ms sleep loop in another process",
              wakeonly="floor without the wait-start trap",
              futextp="wakeonly + empty sys_enter_futex program")
FUTEX_TP = "syscalls:sys_enter_futex"
# gilknocker's poller wakes every 1 ms; so does this, outside the app and without
# the GIL: if it speeds the app up too, the wake-ups do (vCPUs kept from idling)
TICKER = "import time\nprint(flush=True)\nwhile True:\n    time.sleep(0.001)\n"


def median_ci(xs: List[float], draws: int = 2000) -> Tuple[float, float, float]:
    """The median of xs and a 95% percentile-bootstrap interval of it."""
    rng = random.Random(9)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    return statistics.median(xs), meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


class Rig:
    """Every setup's child under its tool; slice(s) runs one slice of load on s's child."""

    def __init__(self, kind: str, python: List[str], setups: List[str]) -> None:
        self.work: Dict[str, Workload] = {}
        self.sessions: Dict[str, Session] = {}
        self.done = threading.Event()
        self.stepper = threading.Thread(target=self.follow, daemon=True)
        self.futex_tp = None
        for s in setups:
            self.work[s] = work = Workload(kind, python)
            process.inspect_process(work.pid)  # fill the caches before timing
            work.batch(0.5)  # warm up
            config = PROBE_SETUPS["floor" if s in FLOOR_VARIANTS else s] \
                if s in PROBE_SETUPS or s in FLOOR_VARIANTS else None
            if config is not None:
                self.sessions[s] = Session(config, lambda _iv: None)
                self.sessions[s].add(work.pid)
            if s in FLOOR_VARIANTS:
                detach_wait_start(self.sessions[s], work.pid)
        if "futextp" in setups:
            from bcc import BPF  # Debian's python3-bpfcc, as the sidecar's
            self.futex_tp = BPF(text="int empty(void *ctx) { return 0; }")
        self.stepper.start()

    def follow(self) -> None:
        while not self.done.is_set():
            for session in list(self.sessions.values()):
                session.step(10)

    def slice(self, s: str, seconds: float) -> Tuple[float, float]:
        """One slice on s's child: (its rate, its CPU s per unit)."""
        work = self.work[s]
        if s == "pyspy":
            rate = with_pyspy(work, lambda: work.batch(seconds))
        elif s == "gilknocker":
            work.child.ask("knock on")
            try:
                rate = work.batch(seconds)
            finally:
                work.child.ask("knock off")
        elif s == "futextp":
            assert self.futex_tp is not None
            self.futex_tp.attach_tracepoint(tp=FUTEX_TP, fn_name="empty")
            try:
                rate = work.batch(seconds)
            finally:
                self.futex_tp.detach_tracepoint(tp=FUTEX_TP)
        elif s == "ticker":
            ticker = subprocess.Popen([sys.executable, "-c", TICKER], stdout=subprocess.PIPE)
            assert ticker.stdout is not None
            ticker.stdout.readline()  # running
            try:
                rate = work.batch(seconds)
            finally:
                ticker.kill()
                ticker.wait()
        else:
            rate = work.batch(seconds)
        return rate, work.cpu_per_op[-1]

    def close(self) -> None:
        self.done.set()
        self.stepper.join()
        for session in self.sessions.values():
            session.close()
        for work in self.work.values():
            work.close()


def detach_wait_start(session: Session, pid: int) -> None:
    """Take the on_wait uprobes off a floor session's child (a bench-only cut:
    the probes' own API attaches a whole probe set)."""
    for point in session.probes.plans[pid]:
        if point.fn_name == "on_wait":
            session.probes._bpf.detach_uprobe(name=point.path, addr=point.address, pid=pid)


def run(kind: str, python: List[str], setups: List[str], cycles: int,
        seconds: float) -> Dict[str, List[Tuple[float, float]]]:
    """N cycles of one slice per setup, the order rotated every cycle."""
    rig = Rig(kind, python, setups)
    try:
        got: Dict[str, List[Tuple[float, float]]] = {s: [] for s in setups}
        for c in range(cycles):
            k = c % len(setups)
            for s in setups[k:] + setups[:k]:
                got[s].append(rig.slice(s, seconds))
            if (c + 1) % 25 == 0:
                print(f"{kind}: {c + 1}/{cycles} cycles", file=sys.stderr, flush=True)
        return got
    finally:
        rig.close()


def table(results: Dict[str, Dict[str, List[Tuple[float, float]]]], setups: List[str],
          python: str, cycles: int, seconds: float,
          ratios: List[Tuple[str, str]] = ()) -> str:
    shown = [s for s in setups if s != "none"]
    lines = [f"Throughput relative to untraced: median of {cycles} paired cycles of "
             f"{seconds:g} s slices [95% interval]; {python}", "",
             "| workload | " + " | ".join(LABELS[s] for s in shown) + " |",
             "|---" * len(setups) + "|"]
    cpu_lines = []
    for kind, got in results.items():
        base = got["none"]
        cells, cpus = [], []
        for s in shown:
            rate = median_ci([a[0] / b[0] for a, b in zip(got[s], base) if b[0]])
            cells.append("%.3f [%.3f, %.3f]" % rate)
            per = [a[1] / b[1] for a, b in zip(got[s], base) if a[1] == a[1] and b[1]]
            cpus.append(f"{s} %.3f [%.3f, %.3f]" % median_ci(per))
        lines.append(f"| {WORKLOADS[kind]} | " + " | ".join(cells) + " |")
        cpu_lines.append(f"{kind}: the child's CPU per unit over untraced's: " + ", ".join(cpus))
        cpu_lines.append(f"{kind}: untraced rate, median slice: "
                         f"{statistics.median(r for r, _ in base):,.0f}/s")
        for a, b in ratios:
            pairs = list(zip(got[a], got[b]))
            rate = median_ci([x[0] / y[0] for x, y in pairs if y[0]])
            cpu = median_ci([x[1] / y[1] for x, y in pairs if x[1] == x[1] and y[1]])
            cpu_lines.append(f"{kind}: {a} over {b}: rate %.3f [%.3f, %.3f], " % rate +
                             "CPU per unit %.3f [%.3f, %.3f]" % cpu)
    return "\n".join(lines + [""] + cpu_lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--slice", type=float, default=0.2, help="seconds per slice")
    parser.add_argument("--workloads", default="http")
    parser.add_argument("--setups", default="none,control,contended,gilknocker,pyspy")
    parser.add_argument("--ratios", default="", help="a/b,...: setup a over setup b too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("paired.py: run as root (eBPF)", file=sys.stderr)
        return 2
    setups = ["none"] + [s for s in args.setups.split(",") if s != "none"]
    ratios = [tuple(r.split("/")) for r in args.ratios.split(",") if r]
    unknown = [s for s in setups if s not in SETUPS] + \
        [k for k in args.workloads.split(",") if k not in WORKLOADS] + \
        [f"--ratios {'/'.join(r)} (a/b, both in --setups)" for r in ratios
         if len(r) != 2 or not set(r) <= set(setups)]
    why = (f"unknown setup or workload: {', '.join(unknown)} (setups: {', '.join(SETUPS)}; "
           f"workloads: {', '.join(WORKLOADS)})" if unknown else
           "--cycles: at least 2 cycles" if args.cycles < 2 else
           "--slice: a slice of more than 0 s" if not args.slice > 0 else None)
    if why:
        print(f"paired.py: {why}", file=sys.stderr)
        return 2
    results = {kind: run(kind, args.python.split(), setups, args.cycles, args.slice)
               for kind in args.workloads.split(",")}
    print(table(results, setups, args.python, args.cycles, args.slice, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
