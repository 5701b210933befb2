"""Timeline maths: histogram buckets, percentiles, blame."""

from __future__ import annotations

from otel_gil.abi import buckets, events
from otel_gil.abi.events import Hold, Interval
from otel_gil.sidecar import timeline


def test_bucket_boundaries_round_trip() -> None:
    # GIVEN every bucket's bounds WHEN a value at each bound is bucketed
    # THEN it lands in that bucket, and the value just below lands in the one before.
    for b in range(1, events.GIL_HIST_BUCKETS - 1):
        low, high = buckets.bucket_bounds(b)
        assert buckets.bucket_of(low) == b
        assert buckets.bucket_of(high - 1) == b
        assert buckets.bucket_of(low - 1) == b - 1


def test_bucket_examples() -> None:
    assert buckets.bucket_of(0) == 0
    assert buckets.bucket_of(63) == 0
    assert buckets.bucket_of(64) == 1
    # 5 ms = 5_000_000 ns: 2^22 = 4_194_304; sub-bucket (5e6 >> 20) & 3 = 0b00 -> 4 + 0
    assert buckets.bucket_of(5_000_000) == 1 + (22 - 6) * 4 + ((5_000_000 >> 20) & 3)
    assert buckets.bucket_of(1 << 62) == events.GIL_HIST_BUCKETS - 1


def test_percentile_interpolates_within_bucket() -> None:
    hist = [0] * events.GIL_HIST_BUCKETS
    b = buckets.bucket_of(5_000_000)
    hist[b] = 100
    low, high = buckets.bucket_bounds(b)
    assert buckets.percentile(hist, 0.5) == low + (high - low) // 2
    assert buckets.percentile(hist, 1.0) == high
    assert buckets.percentile([0] * events.GIL_HIST_BUCKETS, 0.99) == 0


def test_percentile_p99_of_two_clusters() -> None:
    # GIVEN 990 short waits (~2 µs) and 10 long ones (~5 ms)
    hist = [0] * events.GIL_HIST_BUCKETS
    hist[buckets.bucket_of(2_000)] = 990
    hist[buckets.bucket_of(5_000_000)] = 10
    # THEN p99 is at the top of the short cluster, p99.5 inside the long one
    low, high = buckets.bucket_bounds(buckets.bucket_of(2_000))
    assert buckets.percentile(hist, 0.99) == high
    assert 4_194_304 <= buckets.percentile(hist, 0.995) < 6_291_456


def test_blame_charges_overlap_only_and_merges_threads() -> None:
    # GIVEN a wait from 100 to 200 and holds by thread 7 (50..120, 150..210) and 8 (120..150)
    wait = Interval("wait", pid=1, tid=5, start_ns=100, end_ns=200, span=None,
                    holds=(Hold(7, 150, 210, None), Hold(8, 120, 150, None),
                           Hold(7, 50, 120, None)), holds_total=2)
    # THEN 7 held 20 + 50 = 70 within the wait, 8 held 30
    assert timeline.blame(wait) == [timeline.Blame(7, 70), timeline.Blame(8, 30)]
    assert not timeline.holds_truncated(wait)


def test_blame_ignores_holds_outside_the_wait() -> None:
    wait = Interval("wait", 1, 5, 100, 200, None, holds=(Hold(9, 10, 100, None),), holds_total=0)
    assert timeline.blame(wait) == []


def test_truncated_when_more_handoffs_than_holds() -> None:
    wait = Interval("wait", 1, 5, 100, 200, None, holds=(Hold(9, 150, 200, None),),
                    holds_total=3)
    assert timeline.holds_truncated(wait)
