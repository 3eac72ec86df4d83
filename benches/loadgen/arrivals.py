"""The open-loop arrival process: when each request is sent, as offsets from the run's start.

Intervals between requests are gamma-distributed with shape ``burstiness`` and mean 1/rate (as
`vllm bench serve`): burstiness 1 is a Poisson process (exponential intervals, CV 1); below 1 the
arrivals come in bursts (CV = 1/sqrt(burstiness) > 1); above 1 they are more even; inf gives
constant intervals. A rate of inf sends every request at once. The first request goes at 0 (no
dead time before it); the offsets are not rescaled, so the run's mean rate is the process's.
"""

from __future__ import annotations

import math

import numpy as np


def intervals(n: int, rate: float, burstiness: float = 1.0, seed: int | None = 0) -> np.ndarray:
    """n gaps (seconds) between consecutive requests."""
    if not rate > 0:
        raise ValueError(f"request_rate={rate} must be > 0 (inf = all at once)")
    if not burstiness > 0:
        raise ValueError(f"burstiness={burstiness} must be > 0 (1 = Poisson)")
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int | None = 0) -> list[float]:
    """When each of n requests is sent, seconds after the first."""
    gaps = intervals(n, rate, burstiness, seed)
    return [0.0] + np.cumsum(gaps[: max(n - 1, 0)]).tolist() if n else []
