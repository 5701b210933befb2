"""Cost of the probes per GIL transition, as ratios within one run.

    .venv/bin/python bench/overhead.py [--python PATH] [--calls N] [--rounds R]

A child runs `hashlib.sha1(b"x" * 2048)` in a loop: CPython releases and
re-takes the GIL around each call (HASHLIB_GIL_MINSIZE is 2048), so every call
is one release + one acquisition, about 1 µs uncontended (checked: the run
reports acquisitions and releases per call, which must be ~1). Three setups run
interleaved, R rounds each, the order rotated every round, best round kept
(2 noisy cores: only ratios within one run mean anything; the median and max
per setup show the spread):

  none   no probes
  floor  the same uprobes (take_gil entry, its ret(s), pthread_cond_signal),
         each running a BPF program that returns at once (-DEMPTY_PROBES)
  full   otel-gil's real probes

Reported: ns per call for each, the added cost per transition of floor and
full, and full/floor, the figure the project tracks (goal: <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Dict, List

from otel_gil import discovery
from otel_gil.probes import ProbeConfig, Probes

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


def run_batch(child: subprocess.Popen, calls: int) -> float:
    assert child.stdin and child.stdout
    child.stdin.write(f"{calls}\n")
    child.stdin.flush()
    return int(child.stdout.readline()) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    child = subprocess.Popen([args.python, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout
    child.stdout.readline()
    target = discovery.inspect_process(child.pid)
    setups = {"floor": ProbeConfig(empty=True), "full": ProbeConfig()}
    probes = {name: Probes(cfg, lambda _iv: None) for name, cfg in setups.items()}
    order = ["none", "floor", "full"]
    best: Dict[str, List[float]] = {name: [] for name in order}
    acquisitions = releases = 0
    try:
        run_batch(child, args.calls // 10)  # warm up
        for r in range(args.rounds):
            for name in order[r % 3:] + order[:r % 3]:
                if name != "none":
                    probes[name].add(target)  # fresh per-target counters
                best[name].append(run_batch(child, args.calls))
                if name == "full":
                    st = probes[name].target_state(child.pid)
                    acquisitions += st.acq_seq if st else 0
                    releases += st.releases if st else 0
                if name != "none":
                    probes[name].remove(child.pid)
    finally:
        for p in probes.values():
            p.close()
        child.kill()
    none, floor, full = (min(best[k]) for k in order)
    calls = args.calls * args.rounds
    result = {
        "python": args.python,
        "version": ".".join(map(str, target.interpreter.version)),
        "calls_per_round": args.calls, "rounds": args.rounds,
        "acquisitions_per_call": round(acquisitions / calls, 3),
        "releases_per_call": round(releases / calls, 3),
        "ns_per_call": {"none": round(none), "floor": round(floor), "full": round(full)},
        "spread_ns_per_call": {k: {"median": round(statistics.median(v)), "max": round(max(v))}
                               for k, v in best.items()},
        "added_ns_per_transition": {"floor": round(floor - none), "full": round(full - none)},
        "full_over_floor": round((full - none) / (floor - none), 3),
        "slowdown": {"floor": round(floor / none, 2), "full": round(full / none, 2)},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
