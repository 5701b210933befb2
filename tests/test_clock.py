"""otel_gil.sidecar.clock: min-bracket calibration and steps."""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from otel_gil.sidecar.clock import (
    Clock,
    ClockOffset,
    calibrate,
)


def reader(values: list[int]) -> Iterator[int]:
    return iter(values)


class FakeClocks:
    """Monotonic advances 10 ns per read of either clock; realtime = monotonic + offset."""

    def __init__(self, offset: int) -> None:
        self.now = 1_000_000
        self.offset = offset

    def monotonic(self) -> int:
        self.now += 10
        return self.now

    def realtime(self) -> int:
        self.now += 10
        return self.now + self.offset


def test_calibrate_keeps_the_narrowest_bracket() -> None:
    # GIVEN three triples with realtime brackets of 100, 10 and 400 ns
    real = reader([1000, 1100, 2000, 2010, 3000, 3400])
    mono = reader([50, 1500, 2500])
    # WHEN calibrating over them
    offset = calibrate(3, lambda: next(real), lambda: next(mono))
    # THEN the 10 ns one wins: midpoint 2005 - 1500, half-width 5
    assert offset == ClockOffset(offset_ns=505, uncertainty_ns=5, measured_at_mono_ns=1500)
    assert offset.to_realtime(10_000) == 10_505


def test_calibrate_rounds_odd_brackets_up_and_skips_backward_steps() -> None:
    # GIVEN a triple where REALTIME stepped back, then an 11 ns bracket
    real = reader([5000, 4000, 2000, 2011])
    mono = reader([4500, 1500])
    # WHEN calibrating
    offset = calibrate(2, lambda: next(real), lambda: next(mono))
    # THEN the backward triple is ignored; midpoint floors, uncertainty rounds up
    assert offset == ClockOffset(offset_ns=505, uncertainty_ns=6, measured_at_mono_ns=1500)


def test_calibrate_zero_width_reports_one_ns_and_all_backward_raises() -> None:
    # GIVEN a coarse realtime clock that returns the same value twice
    real = reader([700, 700])
    mono = reader([300])
    # THEN the uncertainty is never claimed to be zero
    assert calibrate(1, lambda: next(real), lambda: next(mono)).uncertainty_ns == 1
    # GIVEN only backward brackets THEN calibration fails loudly
    real = reader([10, 5])
    mono = reader([7])
    with pytest.raises(RuntimeError):
        calibrate(1, lambda: next(real), lambda: next(mono))


def test_clock_detects_a_step_and_keeps_both_offsets() -> None:
    # GIVEN a clock calibrated at offset 5 s (bracket 20 ns: uncertainty 10 ns)
    fake = FakeClocks(offset=5_000_000_000)
    clock = Clock(samples=4, realtime=fake.realtime, monotonic=fake.monotonic)
    assert clock.current.offset_ns == 5_000_000_000 and clock.current.uncertainty_ns == 10
    before_step = fake.now
    # WHEN REALTIME drifts by 15 ns (< 10 + 10) and the clock refreshes
    fake.offset += 15
    # THEN that is not a step: one offset, updated in place
    assert clock.refresh() is False
    assert len(clock.history) == 1 and clock.current.offset_ns == 5_000_000_015
    # WHEN REALTIME steps forward by 1 s
    fake.offset += 1_000_000_000
    assert clock.refresh() is True
    # THEN both offsets are kept, and each time converts with the one that held then
    assert clock.steps == 1 and len(clock.history) == 2
    assert clock.to_realtime(before_step) == before_step + 5_000_000_015
    after = fake.now + 1
    assert clock.to_realtime(after) == after + 6_000_000_015


def test_refresh_if_older_than_waits_for_the_age() -> None:
    # GIVEN a fresh clock
    fake = FakeClocks(offset=0)
    clock = Clock(samples=2, realtime=fake.realtime, monotonic=fake.monotonic)
    fake.offset = 1_000  # would be a step if measured
    # WHEN asked to refresh if older than 1 s right away THEN nothing is measured
    assert clock.refresh_if_older_than(1.0) is False
    assert len(clock.history) == 1
    # WHEN 2 s have passed THEN it re-measures and sees the step
    fake.now += 2_000_000_000
    assert clock.refresh_if_older_than(1.0) is True
    assert clock.current.offset_ns == 1_000


def test_real_clocks_calibrate_within_microseconds() -> None:
    # GIVEN this machine's real clocks
    offset = calibrate()
    # THEN the uncertainty is positive and small (a clock_gettime pair is ~100 ns)
    assert 0 < offset.uncertainty_ns < 20_000
    # WHEN converting a monotonic reading taken between two realtime readings
    before = time.time_ns()
    mono = time.monotonic_ns()
    after = time.time_ns()
    converted = offset.to_realtime(mono)
    # THEN it lands inside that bracket, widened by the calibration's uncertainty
    assert before - offset.uncertainty_ns <= converted <= after + offset.uncertainty_ns
    print(f"calibration uncertainty {offset.uncertainty_ns} ns")
