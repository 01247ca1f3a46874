"""Synthetic token-length distributions: `fixed:N`, `uniform:A:B` and `longtail:MEDIAN:MAX`.

Parsed from the `--prompt-len` / `--output-len` / `--long-output-len` flags of
`pdserve bench serve`; sampled with a caller-owned `random.Random`, so a seeded generator gives
the same lengths on every run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

# Spread of the long-tail distribution (log-space standard deviation). With 1.0 the p90 is
# ~3.6x and the p99 ~10x the median: a few long requests among many short ones.
LONGTAIL_SIGMA = 1.0
_STANDARD_NORMAL = NormalDist()
KINDS = ("fixed", "uniform", "longtail")


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths in [`min_tokens`, `max_tokens`], all >= 1.

    `fixed`: always `max_tokens` (== `min_tokens`). `uniform`: every integer in the range
    equally likely. `longtail`: a log-normal with median `median_tokens` (before truncation)
    truncated to [1, `max_tokens`], sampled by inverting its CDF, so the bounds are exact.
    """

    kind: str
    min_tokens: int
    max_tokens: int
    median_tokens: int = 0

    @classmethod
    def parse(cls, text: str) -> LengthDistribution:
        """Parses a spec such as "uniform:32:256"; raises ValueError naming what is wrong."""
        kind, _, rest = text.strip().partition(":")
        numbers = [_positive_int(part, text) for part in rest.split(":")] if rest else []
        if kind == "fixed" and len(numbers) == 1:
            return cls("fixed", numbers[0], numbers[0])
        if kind == "uniform" and len(numbers) == 2:
            low, high = numbers
            if low > high:
                raise ValueError(f"{text!r}: uniform:A:B needs A <= B")
            return cls("uniform", low, high)
        if kind == "longtail" and len(numbers) == 2:
            median, maximum = numbers
            if median > maximum:
                raise ValueError(f"{text!r}: longtail:MEDIAN:MAX needs MEDIAN <= MAX")
            return cls("longtail", 1, maximum, median)
        raise ValueError(
            f"{text!r}: expected fixed:N, uniform:A:B or longtail:MEDIAN:MAX (positive integers)"
        )

    @property
    def spec(self) -> str:
        """The text form `parse` accepts."""
        if self.kind == "fixed":
            return f"fixed:{self.max_tokens}"
        if self.kind == "uniform":
            return f"uniform:{self.min_tokens}:{self.max_tokens}"
        return f"longtail:{self.median_tokens}:{self.max_tokens}"

    def sample(self, rng: random.Random) -> int:
        """One length; consumes draws from `rng` (none for `fixed`)."""
        if self.kind == "fixed":
            return self.max_tokens
        if self.kind == "uniform":
            return rng.randint(self.min_tokens, self.max_tokens)
        return self._sample_longtail(rng)

    def _sample_longtail(self, rng: random.Random) -> int:
        mu = math.log(self.median_tokens)
        # CDF values of the bounds in the standard normal's space: sampling u between them
        # and mapping back gives the truncated distribution without rejection loops.
        low = _STANDARD_NORMAL.cdf((math.log(0.5) - mu) / LONGTAIL_SIGMA)
        high = _STANDARD_NORMAL.cdf((math.log(self.max_tokens + 0.5) - mu) / LONGTAIL_SIGMA)
        u = low + (high - low) * rng.random()
        u = min(max(u, 1e-12), 1.0 - 1e-12)  # inv_cdf is undefined at exactly 0 and 1
        value = math.exp(mu + LONGTAIL_SIGMA * _STANDARD_NORMAL.inv_cdf(u))
        return min(max(round(value), 1), self.max_tokens)


def _positive_int(part: str, text: str) -> int:
    try:
        value = int(part)
    except ValueError:
        raise ValueError(f"{text!r}: {part!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{text!r}: lengths must be >= 1, got {value}")
    return value
