"""Timing one request's token stream as the client sees it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.metrics.router_metrics import RouterMetrics


class StreamTimer:
    """Records TTFT at the first token message and the gap before every later one (retries
    and migrations included: the client waits through them). Event loop only; one per
    request."""

    def __init__(self, metrics: RouterMetrics, admitted_at: float) -> None:
        self._metrics = metrics
        self._admitted_at = admitted_at
        self._last_at: float | None = None

    def tokens_sent(self, num_tokens: int) -> None:
        """Called when a message with `num_tokens` (> 0) tokens is streamed."""
        now = time.monotonic()
        if self._last_at is None:
            self._metrics.time_to_first_token.observe(now - self._admitted_at)
        else:
            self._metrics.inter_token_latency.observe(now - self._last_at)
        self._last_at = now
        self._metrics.streamed_tokens.inc(num_tokens)
