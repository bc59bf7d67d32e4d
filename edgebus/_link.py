"""Per-peer link estimates and an optional token-bucket rate limit.

:class:`LinkEstimator` keeps exponentially weighted moving averages of bandwidth (from real chunk transfers:
bytes delivered over a window of arrivals) and round-trip time (from application heartbeats). A fresh
estimator reports zeros and ``samples == 0``: callers must treat that as "unknown", not "zero".

Bandwidth samples smaller than ``min_sample_bytes`` are ignored: a few kB (a text, a head of token ids)
cross a fast link in less time than the request round trip and the receiver's per-transfer work that the
sample's time also holds, so they would drag the average far below the link's rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Weight of a new sample in the moving averages.
EWMA_ALPHA = 0.25
#: Smallest transfer that counts as a bandwidth sample (see the module docstring).
MIN_SAMPLE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """Measured link to one peer: bandwidth in bytes per second, round-trip time in seconds."""

    bandwidth_bps: float
    rtt_s: float
    samples: int


class LinkEstimator:
    def __init__(self, alpha: float = EWMA_ALPHA, min_sample_bytes: int = MIN_SAMPLE_BYTES) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if min_sample_bytes < 0:
            raise ValueError("min_sample_bytes must be >= 0")
        self._alpha = alpha
        self._min_sample_bytes = min_sample_bytes
        self._bandwidth = 0.0
        self._rtt = 0.0
        self._bw_samples = 0
        self._rtt_samples = 0

    def add_transfer(self, nbytes: int, seconds: float) -> None:
        """One bandwidth sample: ``nbytes`` arrived over ``seconds`` of wall time (ignored when too small)."""
        if nbytes <= 0 or seconds <= 0 or nbytes < self._min_sample_bytes:
            return
        sample = nbytes / seconds
        self._bandwidth = sample if not self._bw_samples else self._ewma(self._bandwidth, sample)
        self._bw_samples += 1

    def add_rtt(self, seconds: float) -> None:
        if seconds < 0:
            return
        self._rtt = seconds if not self._rtt_samples else self._ewma(self._rtt, seconds)
        self._rtt_samples += 1

    def _ewma(self, old: float, new: float) -> float:
        return (1 - self._alpha) * old + self._alpha * new

    def estimate(self) -> LinkEstimate:
        return LinkEstimate(self._bandwidth, self._rtt, self._bw_samples)


class TokenBucket:
    """``rate`` bytes per second with bursts up to ``burst`` bytes; ``acquire(n)`` waits for the tokens.

    Reservations may drive the level negative (debt), so requests larger than ``burst`` are paced, never
    refused, and concurrent callers queue up in the order they reserved.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._level = burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self._burst, self._level + (now - self._stamp) * self._rate)
        self._stamp = now

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` of tokens now (the level may go negative); returns seconds to wait first."""
        self._refill()
        self._level -= nbytes
        return 0.0 if self._level >= 0 else -self._level / self._rate

    async def acquire(self, nbytes: int) -> None:
        delay = self.reserve(nbytes)
        if delay > 0:
            # A rate-limit pause, not a readiness wait: the bucket refills with time.
            await asyncio.sleep(delay)
