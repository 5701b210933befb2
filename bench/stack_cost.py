"""Cost of holder stacks (otel_gil/stacks/store.py) per long hold, as ratios.

    .venv/bin/python bench/stack_cost.py [--python /usr/bin/python3.11] [--holds 300]
                                         [--hold-us 2000] [--rounds 5]

As root. A child Python runs --holds holds of the GIL that block in C (libc
usleep(--hold-us) through ctypes.PyDLL, the case stack capture is for: each
one is taken as the holder blocks, bpf/gil.bpf.c capture_stack) while one
thread spins and waits for the GIL. Each hold's wall time is timed in the
child, around the call. Three variants, interleaved --rounds times, the
minimum per variant kept (noisy neighbours inflate neither side more):

* untraced;
* traced, contended set, holder stacks off (ProbeConfig(stacks=False): no
  sched_switch or perf-sample program loaded);
* traced, holder stacks on (the default).

"on - off" is what capture adds to the holder per hold, in its own context
(the sched_switch program: GIL reads, the frame walk, 12 KiB of stack copied,
bpf_get_stackid). The sidecar side is timed apart: CPU per stack decoded
(Python frames from /proc/PID/mem, .eh_frame unwinding, symbols), first and
cached. Only ratios within one run mean anything (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, ".")

from otel_gil.probes.config import ProbeConfig  # noqa: E402
from otel_gil.probes.session import Session  # noqa: E402
from otel_gil.stacks import store as stacks  # noqa: E402

CHILD = r"""
import ctypes, ctypes.util, json, sys, threading, time
libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6")
holds, hold_us = int(sys.argv[1]), int(sys.argv[2])
stop = threading.Event()

def spin():
    while not stop.is_set():
        sum(range(100))

def hold_in_c():
    libc.usleep(hold_us)

print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
w = threading.Thread(target=spin)
w.start()
times = []
for _ in range(holds):
    t0 = time.perf_counter_ns()
    hold_in_c()
    times.append(time.perf_counter_ns() - t0)
    time.sleep(0.0005)
stop.set()
w.join()
times.sort()
print(json.dumps({"median_ns": times[len(times) // 2]}), flush=True)
"""

VARIANTS = ("untraced", "stacks off", "stacks on")


class DecodeTimer:
    """CPU time of ProcessStacks._decode (the sidecar's work per stack)."""

    def __init__(self) -> None:
        self.samples: List[int] = []
        self._orig = stacks.ProcessStacks._decode

    def __enter__(self) -> "DecodeTimer":
        orig, samples = self._orig, self.samples

        def timed(proc: stacks.ProcessStacks, *a: object) -> stacks.HolderStack:
            t0 = time.thread_time_ns()
            out = orig(proc, *a)  # type: ignore[arg-type]
            samples.append(time.thread_time_ns() - t0)
            return out

        stacks.ProcessStacks._decode = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        stacks.ProcessStacks._decode = self._orig  # type: ignore[method-assign]


def run_once(python: str, holds: int, hold_us: int, variant: str) -> int:
    child = subprocess.Popen([python, "-c", CHILD, str(holds), str(hold_us)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    session: Optional[Session] = None
    try:
        json.loads(child.stdout.readline())
        if variant != "untraced":
            session = Session(ProbeConfig(stacks=variant == "stacks on"))
            session.add(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        while session is not None and not _line_ready(child):
            session.step(50)
            for iv in session.intervals:  # what the sidecar does with each
                stacks.main_holder_stack(iv)
            session.intervals.clear()
        return int(json.loads(child.stdout.readline())["median_ns"])
    finally:
        if session is not None:
            session.close()
        child.kill()
        child.wait()


def _line_ready(child: "subprocess.Popen[str]") -> bool:
    assert child.stdout is not None
    return bool(select.select([child.stdout], [], [], 0.01)[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default="/usr/bin/python3.11")
    parser.add_argument("--holds", type=int, default=300)
    parser.add_argument("--hold-us", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    best: Dict[str, int] = {}
    with DecodeTimer() as timer:
        for _ in range(args.rounds):
            for variant in VARIANTS:  # interleaved
                ns = run_once(args.python, args.holds, args.hold_us, variant)
                best[variant] = min(best.get(variant, ns), ns)
    base = best["untraced"]
    print(f"{args.python}: {args.holds} holds of usleep({args.hold_us} us) under PyDLL, "
          f"median per hold, min of {args.rounds} rounds")
    for variant in VARIANTS:
        print(f"  {variant:<11} {best[variant] / 1e3:9.1f} us  x{best[variant] / base:.4f}")
    print(f"  capture per long hold (on - off): "
          f"{(best['stacks on'] - best['stacks off']) / 1e3:+.1f} us")
    if timer.samples:
        first, rest = timer.samples[0], sorted(timer.samples[1:]) or [0]
        print(f"  sidecar decode per stack: first {first / 1e6:.1f} ms (objects parsed), "
              f"then median {rest[len(rest) // 2] / 1e3:.0f} us ({len(timer.samples)} stacks)")


if __name__ == "__main__":
    main()
