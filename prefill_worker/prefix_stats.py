"""How much of the prompts a prefill replica batched its prefix cache served.

Hit rate = cached prompt tokens / prompt tokens, over the replica's lifetime. The counts go to
the load report, the Prometheus counters, and a DEBUG log line at most every
`LOG_INTERVAL_S` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from pdserve.metrics import ReplicaMetrics
from prefill_worker.job import PrefillJob

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0


class PrefixCacheStats:
    """Lifetime prefix-cache counts of one replica. Called by the batch loop on the event
    loop, once per pass; never blocks."""

    def __init__(
        self,
        metrics: ReplicaMetrics,
        replica_id: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._replica_id = replica_id
        self._clock = clock
        self._logged_at = clock()
        self.total_prompt_tokens = 0
        self.total_cached_tokens = 0

    @property
    def hit_rate(self) -> float:
        if self.total_prompt_tokens == 0:
            return 0.0
        return self.total_cached_tokens / self.total_prompt_tokens

    def record_pass(self, batch: Sequence[PrefillJob], num_cached_blocks: int) -> None:
        """Counts the prompt tokens of one pass's jobs and those of them served from the
        cache; logs the running hit rate if the last log is `LOG_INTERVAL_S` old."""
        num_prompt = sum(job.num_prompt_tokens for job in batch)
        num_cached = sum(job.num_cached_tokens for job in batch)
        self.total_prompt_tokens += num_prompt
        self.total_cached_tokens += num_cached
        self._metrics.count_prefix_cache(num_prompt, num_cached)
        now = self._clock()
        if now - self._logged_at >= LOG_INTERVAL_S:
            self._logged_at = now
            logger.debug(
                "prefix cache of %s: hit rate %.1f%% (%d of %d prompt tokens), %d blocks cached",
                self._replica_id, 100 * self.hit_rate, self.total_cached_tokens,
                self.total_prompt_tokens, num_cached_blocks,
            )
