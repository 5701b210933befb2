"""The holder-stack option shared by record/top/run and sidecar (otel_gil/stacks/store.py)."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from otel_gil.config import DEFAULT_STACK_THRESHOLD_MS


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def add_stack_threshold_option(parser: argparse.ArgumentParser,
                               default: float = DEFAULT_STACK_THRESHOLD_MS) -> None:
    parser.add_argument(
        "--stack-threshold-ms", type=non_negative_float, default=default,
        help=f"holder stacks: a holder that keeps the CPU has its stack taken once it has "
             f"held the GIL this long, and waits this long carry their holder's stack "
             f"(default {default:g}; 0: no holder stacks)")


def stack_settings(threshold_ms: float) -> Dict[str, Any]:
    """ProbeConfig keywords for --stack-threshold-ms."""
    if threshold_ms <= 0:
        return {"stacks": False}
    return {"stack_threshold_ns": int(threshold_ms * 1e6)}
