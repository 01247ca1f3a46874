"""When open-loop requests are sent: send times in seconds after the benchmark's start.

Open loop means the schedule does not wait for responses: a slow server faces the same
arrivals as a fast one, so queueing shows up in the latencies instead of lowering the load.
(The closed loop, a fixed number of requests in flight, lives in the runner.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def poisson_arrivals(rate_per_s: float, rng: random.Random) -> Iterator[float]:
    """Endless send times of a Poisson process of `rate_per_s` (exponential gaps), from 0.

    The first request goes at 0 (no idle warm-up gap). An infinite rate sends everything at
    0. Raises ValueError for a rate that is not positive.
    """
    if not rate_per_s > 0:
        raise ValueError(f"rate must be > 0, got {rate_per_s}")
    at_s = 0.0
    while True:
        yield at_s
        if not math.isinf(rate_per_s):
            at_s += rng.expovariate(rate_per_s)


def periodic_arrivals(every_s: float, start_s: float) -> Iterator[float]:
    """Endless send times `start_s`, `start_s + every_s`, ... Raises ValueError unless
    `every_s` > 0 and `start_s` >= 0."""
    if not every_s > 0 or not start_s >= 0:
        raise ValueError(f"need every > 0 and start >= 0, got every={every_s} start={start_s}")
    index = 0
    while True:
        # Multiplying, not summing, keeps the times free of accumulated rounding.
        yield start_s + index * every_s
        index += 1
