"""The life of one request inside the router.

1. **Place.** Mint the request id (never the client's). An `Attempt` reserves KV blocks on the
   decode replica with the most free blocks (back-pressure comes from decode capacity), picks
   the least-loaded prefill replica, and mints the transfer id.
2. **Prefill.** The attempt's first token comes from prefill and is detokenized and sent to the
   client at once.
3. **Hand-off + decode.** The KV moves to the reserved blocks; decode streams the rest.
4. **Stream.** Tokens are detokenized incrementally (multi-byte safe), stop strings are honoured
   across token boundaries, the deadline is enforced, and the stream ends with a `Completion`.
5. **Failures.** A replica that dies or stalls before any token was sent: start over on other
   replicas (`reliability.prefill_retries`). After tokens were sent: `fail` (UNAVAILABLE, with
   the number of tokens sent) or `migrate` (a new attempt prefills prompt + sent tokens on a
   live pair and continues the same stream: no duplicate, no gap).
6. **Clean up.** Whatever ends an attempt early (cancel, deadline, error, stop string, a first
   token that already finishes the request), it aborts its transfer id on both replicas, which
   frees the prefill lease and the decode blocks at once.

In `mode: colocated` each attempt is a `ColocatedAttempt` instead: one replica of the colocated
pool prefills and decodes (steps 1-3 are one stream, no KV moves); steps 4-6 are the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.config import PdserveConfig
from pdserve.errors import Unavailable
from pdserve.messages import TokenLogprobs
from pdserve.metrics import RouterMetrics
from router.attempt import Attempt, AttemptReport, ReplicaLost
from router.colocated_attempt import ColocatedAttempt
from router.replica_pool import ReplicaPool
from router.text_output import TextOutput
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """What the final message reports."""

    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_completion_tokens: int
    timings: dict[str, float]
    mode: str
    kv_transport: str
    prefill_replica: str
    decode_replica: str
    kv_bytes: int
    num_migrations: int = 0
    # Prompt tokens whose KV came from a prefill replica's prefix cache.
    num_cached_tokens: int = 0


@dataclass
class StreamChunk:
    token_ids: list[int]
    text: str
    completion: Completion | None = None
    # One per token id when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class RequestFlow:
    def __init__(
        self,
        config: PdserveConfig,
        tokenizer: RouterTokenizer,
        prefill_pool: ReplicaPool,
        decode_pool: ReplicaPool,
        metrics: RouterMetrics | None = None,
        colocated_pool: ReplicaPool | None = None,
    ) -> None:
        """`colocated_pool` is required (and the only pool used) in `mode: colocated`."""
        self._config = config
        self._tokenizer = tokenizer
        self._pools = (prefill_pool, decode_pool)
        self._metrics = metrics or RouterMetrics()
        if config.mode == "colocated" and colocated_pool is None:
            raise ValueError("mode colocated needs the colocated pool")
        # Set in colocated mode only: then every attempt is a ColocatedAttempt on it.
        self._colocated_pool = colocated_pool if config.mode == "colocated" else None

    async def run(
        self, request: ValidatedRequest, deadline: float, request_id: str | None = None
    ) -> AsyncIterator[StreamChunk]:
        """Streams one request; raises a PdserveError on failure. `deadline` is wall-clock;
        `request_id` is minted by the router (a fresh one when None), never the client's."""
        request_id = request_id or uuid.uuid4().hex
        admitted_at = time.monotonic()
        text = TextOutput(
            self._tokenizer, request.prompt_token_ids, request.stop,
            request.sampling.min_tokens,
        )
        sent: list[int] = []
        timings: dict[str, float] = {}
        num_retries = num_migrations = num_cached_tokens = 0
        timer = self._metrics.stream_timer(admitted_at)
        while True:
            num_previous = len(sent)
            attempt = self._new_attempt(request, sent, request_id, deadline)
            tokens = attempt.tokens()
            try:
                finish_reason = ""
                async for event in tokens:
                    if not sent:
                        timings["time_to_first_token_s"] = time.monotonic() - admitted_at
                        num_cached_tokens = attempt.report.num_cached_tokens
                    if event.token_ids:
                        timer.tokens_sent(len(event.token_ids))
                    sent.extend(event.token_ids)
                    chunk = StreamChunk(
                        event.token_ids, text.push(event.token_ids), logprobs=event.logprobs
                    )
                    if chunk.token_ids or chunk.text:
                        yield chunk
                    finish_reason = "stop" if text.stopped else event.finish_reason
                    if finish_reason:
                        break
                report = attempt.report
            except ReplicaLost as lost:
                await self._refresh()
                if not sent and num_retries < self._config.reliability.prefill_retries:
                    num_retries += 1
                    self._metrics.count_retry()
                    logger.warning("request %s: %s; retrying", request_id, lost.message)
                    continue
                if sent and self._may_migrate(num_migrations):
                    num_migrations += 1
                    self._metrics.count_migration()
                    logger.warning(
                        "request %s: %s after %d tokens; migrating", request_id, lost.message,
                        len(sent),
                    )
                    continue
                raise Unavailable(f"{lost.message} after {len(sent)} tokens were sent") from None
            finally:
                await tokens.aclose()
                attempt.close()
            timings.update(report.timings, total_s=time.monotonic() - admitted_at)
            self._metrics.observe_completion(timings, len(sent) - num_previous)
            completion = self._completion(
                request_id, request, finish_reason, text, timings, report, num_migrations,
                num_cached_tokens,
            )
            yield StreamChunk([], text.finish(), completion)
            return

    def _new_attempt(
        self, request: ValidatedRequest, sent: list[int], request_id: str, deadline: float
    ) -> Attempt | ColocatedAttempt:
        eos_token_ids = self._tokenizer.eos_token_ids
        if self._colocated_pool is not None:
            return ColocatedAttempt(
                self._config, self._colocated_pool, eos_token_ids, request, sent, request_id,
                deadline, self._metrics,
            )
        return Attempt(
            self._config, self._pools, eos_token_ids, request, sent, request_id, deadline,
            self._metrics,
        )

    def _may_migrate(self, num_migrations: int) -> bool:
        reliability = self._config.reliability
        return (
            reliability.on_decode_failure == "migrate"
            and num_migrations < reliability.max_migrations
        )

    async def _refresh(self) -> None:
        """Re-polls the pools so the next attempt is placed on live replicas only."""
        pools = self._pools if self._colocated_pool is None else (self._colocated_pool,)
        await asyncio.gather(*(pool.poll_once() for pool in pools))

    def _completion(
        self,
        request_id: str,
        request: ValidatedRequest,
        finish_reason: str,
        text: TextOutput,
        timings: dict[str, float],
        report: AttemptReport,
        num_migrations: int,
        num_cached_tokens: int,
    ) -> Completion:
        return Completion(
            request_id=request_id,
            finish_reason=finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_completion_tokens=text.num_tokens,
            timings=timings,
            mode=self._config.mode,
            kv_transport=report.kv_transport,
            prefill_replica=report.prefill_replica,
            decode_replica=report.decode_replica,
            kv_bytes=report.kv_bytes,
            num_migrations=num_migrations,
            num_cached_tokens=num_cached_tokens,
        )
