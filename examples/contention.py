"""A small app whose threads fight over the GIL: the workload `record` is shown on.

Four CPU-bound threads (pure-Python loops: they hold the GIL until a waiter's
drop request makes them hand it over, every ~5 ms) and one I/O thread that
keeps releasing and re-taking it, and so waits behind them (the convoy effect).

    python examples/contention.py [--seconds S]

Prints {"pid": ..., "ready": true} and then one JSON line per thread at the end:
its native id, name and CPU time (time.thread_time_ns), so a trace can be
checked against it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time


def name_os_thread() -> None:
    """Give the OS thread the Python thread's name (CPython < 3.14 does not), so
    tools reading /proc, such as `otel-gil record`, show it."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, threading.current_thread().name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def burn(seconds: float, out: dict) -> None:
    name_os_thread()
    start_cpu = time.thread_time_ns()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += sum(i * i for i in range(200))
    out[threading.get_native_id()] = (threading.current_thread().name,
                                      time.thread_time_ns() - start_cpu)


def io_loop(seconds: float, out: dict) -> None:
    name_os_thread()
    start_cpu = time.thread_time_ns()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.001)  # releases the GIL; re-taking it means waiting behind the burners
    out[threading.get_native_id()] = (threading.current_thread().name,
                                      time.thread_time_ns() - start_cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--burners", type=int, default=4)
    parser.add_argument("--wait-for-go", action="store_true",
                        help="after printing ready, wait for a line on stdin before starting")
    args = parser.parse_args()
    print(json.dumps({"pid": os.getpid(), "ready": True}), flush=True)
    if args.wait_for_go:
        sys.stdin.readline()
    out: dict = {}
    threads = [threading.Thread(target=burn, args=(args.seconds, out), name=f"burner-{i}")
               for i in range(args.burners)]
    threads.append(threading.Thread(target=io_loop, args=(args.seconds, out), name="io"))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tid, (name, cpu_ns) in out.items():
        print(json.dumps({"tid": tid, "name": name, "cpu_ns": cpu_ns}), flush=True)


if __name__ == "__main__":
    main()
