"""bench/paired.py's statistics, and its and bench/programs.py's refusals: pure logic and argument
handling (the benchmark itself is run by hand, never timed here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import paired  # noqa: E402


def test_median_ci_brackets_the_median_and_narrows_with_more_cycles() -> None:
    # GIVEN per-cycle ratios scattered ±20% around 0.95, few and many
    few = [0.95 + 0.2 * ((i * 7919) % 101 / 100 - 0.5) for i in range(20)]
    many = few * 25
    # WHEN their medians' intervals are taken
    med, lo, hi = paired.median_ci(few)
    med_many, lo_many, hi_many = paired.median_ci(many)
    # THEN each interval holds its median, and 25 times the cycles narrow it
    assert lo <= med <= hi and lo_many <= med_many <= hi_many
    assert hi - lo > 0
    assert (hi_many - lo_many) < (hi - lo) / 2


def test_median_ci_of_identical_ratios_is_that_ratio() -> None:
    assert paired.median_ci([1.0] * 9) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("argv, said", [
    (["--setups", "none,nosuch"], "unknown setup or workload"),
    (["--workloads", "nosuch"], "unknown setup or workload"),
    (["--cycles", "1"], "at least 2 cycles"),
    (["--slice", "0"], "a slice of more than 0 s"),
])
def test_paired_refuses_bad_arguments_in_one_line(argv: list, said: str) -> None:
    _refuses("paired.py", argv, said)


@pytest.mark.parametrize("argv, said", [
    (["--setups", "contended,nosuch"], "unknown setup or workload"),
    (["--workloads", "nosuch"], "unknown setup or workload"),
    (["--seconds", "0"], "more than 0 s of load"),
])
def test_programs_refuses_bad_arguments_in_one_line(argv: list, said: str) -> None:
    _refuses("programs.py", argv, said)


def _refuses(script: str, argv: list, said: str) -> None:
    # WHEN a bench script is given a setup, workload or count it cannot run
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script)] + argv,
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    # THEN it says which in one line and exits 2 before starting any child
    if os.geteuid() != 0:
        said = "run as root"
    assert out.returncode == 2, out
    assert said in out.stderr and "Traceback" not in out.stderr, out
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out
