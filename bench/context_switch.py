"""Cost of publishing the active span (otel_gil.app.context) per context switch.

Times N pairs of ``context.attach(ctx)`` / ``context.detach(token)`` of a
context holding a recording SDK span, with and without the hook, and the same
through ``trace.use_span(span)`` (what ``start_as_current_span`` does after
creating the span), and a whole ``with tracer.start_as_current_span()`` of a
new span each time (what an app pays per span: the hook's first sight of a
span, and whatever the spans it remembers cost the garbage collector; the
span-end hook otel-gil adds to an SDK provider is on in both variants). The
two variants run interleaved, several repetitions each,
and the minimum per variant is kept, so that noisy neighbours on a shared VM
inflate neither side more than the other.

    .venv/bin/python bench/context_switch.py [-n 200000] [-r 7]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider

from otel_gil.app import context as otel_gil_context


def attach_detach(ctx: context.Context, n: int) -> int:
    attach, detach = context.attach, context.detach
    start = time.perf_counter_ns()
    for _ in range(n):
        detach(attach(ctx))
    return time.perf_counter_ns() - start


def use_span(span: trace.Span, n: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(n):
        with trace.use_span(span, end_on_exit=False):
            pass
    return time.perf_counter_ns() - start


def new_spans(tracer: trace.Tracer, n: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(n):
        with tracer.start_as_current_span("bench"):
            pass
    return time.perf_counter_ns() - start


def measure(n: int, repeats: int) -> dict[str, dict[bool, float]]:
    provider = TracerProvider()
    otel_gil_context.watch_span_ends(provider)
    tracer = provider.get_tracer("bench")
    span = tracer.start_span("bench")
    ctx = trace.set_span_in_context(span)
    cases: dict[str, Callable[[int], int]] = {
        "attach+detach": lambda k: attach_detach(ctx, k),
        "use_span enter+exit": lambda k: use_span(span, k),
        "new span, as current": lambda k: new_spans(tracer, max(k // 10, 1)) * 10,
    }
    best: dict[str, dict[bool, float]] = {name: {} for name in cases}
    for name, run in cases.items():
        run(n // 10)  # warm up caches and the hook's per-thread slot
        samples: dict[bool, list[int]] = {False: [], True: []}
        for _ in range(repeats):
            for hooked in (False, True):  # interleaved
                if hooked:
                    otel_gil_context.install()
                else:
                    otel_gil_context.uninstall()
                samples[hooked].append(run(n))
        otel_gil_context.uninstall()
        best[name] = {hooked: min(values) / n for hooked, values in samples.items()}
    span.end()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="pairs per repetition")
    parser.add_argument("-r", type=int, default=7, help="repetitions per variant")
    args = parser.parse_args()
    for name, result in measure(args.n, args.r).items():
        plain, hooked = result[False], result[True]
        print(f"{name:22s} plain {plain:7.1f} ns  hooked {hooked:7.1f} ns  "
              f"added {hooked - plain:6.1f} ns  ratio {hooked / plain:.2f}")


if __name__ == "__main__":
    main()
