"""Link estimator EWMA and the token bucket (with a fake clock)."""

from __future__ import annotations

import pytest

from edgebus._link import MIN_SAMPLE_BYTES, LinkEstimator, TokenBucket


def test_estimator_starts_unknown_then_averages() -> None:
    est = LinkEstimator(alpha=0.5, min_sample_bytes=0)
    assert est.estimate().samples == 0
    est.add_transfer(1000, 1.0)
    assert est.estimate().bandwidth_bps == 1000
    est.add_transfer(3000, 1.0)
    assert est.estimate().bandwidth_bps == 2000
    est.add_rtt(0.2)
    est.add_rtt(0.4)
    assert est.estimate().rtt_s == pytest.approx(0.3)
    est.add_transfer(0, 1.0)  # ignored: no information
    assert est.estimate().samples == 2


def test_token_bucket_paces_to_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=100.0, burst=50.0, clock=lambda: now[0])
    assert bucket.reserve(50) == 0.0
    assert bucket.reserve(100) == pytest.approx(1.0)  # 100 bytes of debt at 100 B/s
    now[0] = 1.0
    assert bucket.reserve(10) == pytest.approx(0.1)
    now[0] = 10.0
    assert bucket.reserve(50) == 0.0  # refilled, capped at burst


def test_small_transfers_are_not_bandwidth_samples() -> None:
    """A 20 kB text over a fast link is all round trip: it must not drag the estimate down."""
    est = LinkEstimator(alpha=0.5)
    est.add_transfer(MIN_SAMPLE_BYTES, 0.001)
    est.add_transfer(20_000, 0.01)
    assert est.estimate().samples == 1
    assert est.estimate().bandwidth_bps == MIN_SAMPLE_BYTES / 0.001
    with pytest.raises(ValueError):
        LinkEstimator(min_sample_bytes=-1)


async def test_acquire_waits() -> None:
    bucket = TokenBucket(rate=1e6, burst=10.0)
    await bucket.acquire(10)
    await bucket.acquire(1000)  # about a millisecond of debt
