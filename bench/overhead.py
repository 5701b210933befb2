"""Cost of each probe set per GIL transition, per interpreter, as ratios within one run.

    .venv/bin/python bench/overhead.py [--python PY ...] [--calls N] [--rounds R]

A child runs `hashlib.sha1(b"x" * 2048)` in a loop: CPython releases and
re-takes the GIL around each call (HASHLIB_GIL_MINSIZE is 2048), so every call
is one uncontended transition (a release and an acquisition that finds the
GIL free), about 1 µs untraced. Setups, interleaved, R rounds each, the order
rotated every round, best round kept (2 noisy cores: only ratios within one
run mean anything; the median per setup shows the spread):

  none        no probes
  contended   --probes contended: its probes sit only on take_gil's timed
              wait, so it should add nothing here
  all         --probes all: a held probe and a release probe per transition
  all_floor   the same uprobes as `all`, each running a BPF program that
              returns at once (-DEMPTY_PROBES): the price of the traps alone

Checked on the way: with `all`, acquisitions and releases per call must be
1.0, and the contended set's programs must not have run at all.

Reported per interpreter: ns per call of each setup, ns added per transition
by each set, all/all_floor (what otel-gil's BPF code costs over the traps),
and a Markdown table of all interpreters at the end. `--python` takes a
command ('chroot DIR /usr/bin/python3.14' works) and may be repeated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any, Dict, List

from otel_gil.probes.config import ProbeConfig
from otel_gil.probes.loader import Probes
from otel_gil.target import process

CHILD = r"""
import hashlib, sys, time
data = b"x" * 2048
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        hashlib.sha1(data)
    print(time.perf_counter_ns() - t0, flush=True)
"""

SETUPS = {"contended": ProbeConfig(probes="contended"), "all": ProbeConfig(probes="all"),
          "all_floor": ProbeConfig(probes="all", empty=True)}


def run_batch(child: subprocess.Popen, calls: int) -> float:  # type: ignore[type-arg]
    assert child.stdin and child.stdout
    child.stdin.write(f"{calls}\n")
    child.stdin.flush()
    return int(child.stdout.readline()) / calls


def measure(python: str, probes: Dict[str, Probes], calls: int, rounds: int) -> Dict[str, Any]:
    child = subprocess.Popen(python.split() + ["-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout
    child.stdout.readline()
    target = process.inspect_process(child.pid)
    order = ["none", *SETUPS]
    times: Dict[str, List[float]] = {name: [] for name in order}
    seen = {"acquisitions": 0, "releases": 0, "contended_runs": 0}
    try:
        run_batch(child, calls // 10)  # warm up
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                if name != "none":
                    probes[name].add(target)  # fresh per-target counters
                times[name].append(run_batch(child, calls))
                if name == "all":
                    st = probes[name].target_state(child.pid)
                    seen["acquisitions"] += st.acq_seq if st else 0
                    seen["releases"] += st.releases if st else 0
                if name == "contended":
                    seen["contended_runs"] += sum(
                        t.timed_waits for t in probes[name].threads().values())
                if name != "none":
                    probes[name].remove(child.pid)
    finally:
        child.kill()
        child.wait()
    best = {k: min(v) for k, v in times.items()}
    total = calls * rounds
    added = {k: round(best[k] - best["none"]) for k in SETUPS}
    return {
        "python": python,
        "version": ".".join(map(str, target.interpreter.version)),
        "calls_per_round": calls, "rounds": rounds,
        "acquisitions_per_call": round(seen["acquisitions"] / total, 3),
        "releases_per_call": round(seen["releases"] / total, 3),
        "contended_program_runs": seen["contended_runs"],
        "ns_per_call": {k: round(v) for k, v in best.items()},
        "spread_ns_per_call": {k: {"median": round(statistics.median(v)), "max": round(max(v))}
                               for k, v in times.items()},
        "added_ns_per_transition": added,
        "all_over_floor": round(added["all"] / added["all_floor"], 3)
        if added["all_floor"] > 0 else None,
    }


def table(rows: List[Dict[str, Any]]) -> str:
    out = ["| interpreter | untraced ns/call | contended: added ns | all: added ns | "
           "all floor (empty programs) | all/floor | acq., rel. per call |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["added_ns_per_transition"]
        out.append(f"| {r['python']} ({r['version']}) | {r['ns_per_call']['none']} | "
                   f"{a['contended']} | {a['all']} | {a['all_floor']} | {r['all_over_floor']} | "
                   f"{r['acquisitions_per_call']}, {r['releases_per_call']} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[])
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    probes = {name: Probes(cfg, lambda _iv: None) for name, cfg in SETUPS.items()}
    rows = []
    try:
        for python in args.python or [sys.executable]:
            rows.append(measure(python, probes, args.calls, args.rounds))
            print(json.dumps(rows[-1], indent=1), flush=True)
    finally:
        for p in probes.values():
            p.close()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
