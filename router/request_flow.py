"""The life of one request inside the router.

0. **Admit** (`router.front_door`, before this flow runs). Validation, the deadline, an
   in-flight slot (waiting in the router queue, `router.wait_queue`, while none is free) and an
   `Admission`: the wall-clock `admitted_at` that, with the request's priority, orders it in
   the router queue and on the decode replicas, the same for every attempt and choice.
1. **Place.** Mint the request id (never the client's). An `Attempt` reserves KV blocks on the
   decode replica with the most free blocks (back-pressure comes from decode capacity; when no
   replica has room, it waits in the router queue), picks the least-loaded prefill replica, and
   mints the transfer id.
2. **Prefill.** The attempt's first token comes from prefill and is detokenized and sent to the
   client at once.
3. **Hand-off + decode.** The KV moves to the reserved blocks; decode streams the rest, growing
   the sequence's blocks as it goes.
4. **Stream.** Tokens are detokenized incrementally (multi-byte safe), stop strings are honoured
   across token boundaries, the deadline is enforced, and the stream ends with a `Completion`.
5. **Failures.** A replica that dies or stalls before any token was sent: start over on other
   replicas (`reliability.prefill_retries`). After tokens were sent: `fail` (UNAVAILABLE, with
   the number of tokens sent) or `migrate` (a new attempt prefills prompt + sent tokens on a
   live pair and continues the same stream: no duplicate, no gap).
6. **Preemption.** A decode replica that ran out of blocks may preempt the request (its KV is
   freed; the attempt raises `Preempted`). A new attempt re-prefills prompt + sent tokens, as a
   migration does but whatever `on_decode_failure` says and without counting as one; its
   reservation waits in the router queue like any other. More than
   `reliability.max_preemptions` preemptions fail the request with RESOURCE_EXHAUSTED.
7. **Clean up.** Whatever ends an attempt early (cancel, deadline, error, stop string, a first
   token that already finishes the request), it aborts its transfer id on both replicas, which
   frees the prefill lease and the decode blocks at once, and signals the router queue.

`timings.queue_s` is the time spent in the router queue (front door and every attempt) plus the
last attempt's wait on its prefill replica. In `mode: colocated` each attempt is a
`ColocatedAttempt` instead: one replica of the colocated pool prefills and decodes (steps 1-3
are one stream, no KV moves); the other steps are the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from pdserve.config import PdserveConfig
from pdserve.errors import PdserveError, Unavailable
from pdserve.messages import TokenLogprobs
from pdserve.metrics import RouterMetrics
from router.admission import Admission
from router.attempt import Attempt, AttemptReport, ReplicaLost
from router.colocated_attempt import ColocatedAttempt
from router.preemption import Preempted, check_preemptions
from router.replica_pool import ReplicaPool
from router.text_output import TextOutput
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest
from router.wait_queue import WaitQueue, router_queue

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
    # Times a replica preempted the request and it was re-prefilled.
    num_preemptions: int = 0


@dataclass
class StreamChunk:
    token_ids: list[int]
    text: str
    completion: Completion | None = None
    # One per token id when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class _Progress:
    """One request's state across its attempts (owned by its `run`)."""

    # Token ids sent to the client so far: what a new attempt re-prefills after the prompt.
    sent: list[int] = field(default_factory=list)
    num_retries: int = 0
    num_migrations: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    # Seconds in the router queue: the front door's wait, then every attempt's.
    queued_s: float = 0.0


class RequestFlow:
    def __init__(
        self,
        config: PdserveConfig,
        tokenizer: RouterTokenizer,
        prefill_pool: ReplicaPool,
        decode_pool: ReplicaPool,
        metrics: RouterMetrics | None = None,
        colocated_pool: ReplicaPool | None = None,
        wait_queue: WaitQueue | None = None,
    ) -> None:
        """`colocated_pool` is required (and the only pool used) in `mode: colocated`.
        `wait_queue` is the router's one queue, shared with the front door (a new one when
        None); a poll that finds more room on the pool attempts reserve on signals it."""
        self._config = config
        self._tokenizer = tokenizer
        self._pools = (prefill_pool, decode_pool)
        self._metrics = metrics or RouterMetrics()
        if config.mode == "colocated" and colocated_pool is None:
            raise ValueError("mode colocated needs the colocated pool")
        # Set in colocated mode only: then every attempt is a ColocatedAttempt on it.
        self._colocated_pool = colocated_pool if config.mode == "colocated" else None
        self.wait_queue = wait_queue or router_queue(config)
        reserving_pool = self._colocated_pool or decode_pool
        reserving_pool.on_more_room.append(self.wait_queue.notify)

    async def run(
        self,
        request: ValidatedRequest,
        deadline: float,
        request_id: str | None = None,
        admission: Admission | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Streams one request; raises a PdserveError on failure. `deadline` is wall-clock;
        `request_id` is minted by the router (a fresh one when None), never the client's;
        `admission` is the front door's (one made now when None)."""
        request_id = request_id or uuid.uuid4().hex
        admission = admission or Admission.now()
        text = TextOutput(
            self._tokenizer, request.prompt_token_ids, request.stop,
            request.sampling.min_tokens,
        )
        progress = _Progress(queued_s=admission.queued_s)
        chunks = self._attempts(request, request_id, deadline, admission, text, progress)
        try:
            async for chunk in chunks:
                yield chunk
        except PdserveError as exc:
            raise _saying_tokens_sent(exc, len(progress.sent)) from None
        finally:
            await chunks.aclose()

    async def _attempts(
        self,
        request: ValidatedRequest,
        request_id: str,
        deadline: float,
        admission: Admission,
        text: TextOutput,
        progress: _Progress,
    ) -> AsyncGenerator[StreamChunk, None]:
        """Runs attempts until one finishes the request (see the module docstring)."""
        timings: dict[str, float] = {}
        timer = self._metrics.stream_timer(admission.started)
        while True:
            num_previous = len(progress.sent)
            attempt = self._new_attempt(request, progress.sent, request_id, deadline, admission)
            tokens = attempt.tokens()
            try:
                finish_reason = ""
                async for event in tokens:
                    if not progress.sent:
                        timings["time_to_first_token_s"] = time.monotonic() - admission.started
                        progress.num_cached_tokens = attempt.report.num_cached_tokens
                    if event.token_ids:
                        timer.tokens_sent(len(event.token_ids))
                    progress.sent.extend(event.token_ids)
                    chunk = StreamChunk(
                        event.token_ids, text.push(event.token_ids), logprobs=event.logprobs
                    )
                    if chunk.token_ids or chunk.text:
                        yield chunk
                    finish_reason = "stop" if text.stopped else event.finish_reason
                    if finish_reason:
                        break
            except ReplicaLost as lost:
                await self._refresh()
                self._after_lost(lost, progress, request_id)
                continue
            except Preempted as preempted:
                self._after_preempted(preempted, progress, request_id)
                continue
            finally:
                await tokens.aclose()
                attempt.close()
                progress.queued_s += attempt.report.queued_s
            report = attempt.report
            timings.update(report.timings, total_s=time.monotonic() - admission.started)
            if progress.queued_s or "queue_s" in timings:
                timings["queue_s"] = timings.get("queue_s", 0.0) + progress.queued_s
            self._metrics.observe_completion(timings, len(progress.sent) - num_previous)
            completion = self._completion(
                request_id, request, finish_reason, text, timings, report, progress
            )
            yield StreamChunk([], text.finish(), completion)
            return

    def _after_lost(self, lost: ReplicaLost, progress: _Progress, request_id: str) -> None:
        """Counts a retry or a migration when the policy allows one; else raises UNAVAILABLE
        with the number of tokens sent."""
        num_sent = len(progress.sent)
        if not num_sent and progress.num_retries < self._config.reliability.prefill_retries:
            progress.num_retries += 1
            self._metrics.count_retry()
            logger.warning("request %s: %s; retrying", request_id, lost.message)
            return
        if num_sent and self._may_migrate(progress.num_migrations):
            progress.num_migrations += 1
            self._metrics.count_migration()
            logger.warning(
                "request %s: %s after %d tokens; migrating", request_id, lost.message, num_sent
            )
            return
        raise Unavailable(f"{lost.message} after {num_sent} tokens were sent") from None

    def _after_preempted(
        self, preempted: Preempted, progress: _Progress, request_id: str
    ) -> None:
        """Counts the preemption; raises RESOURCE_EXHAUSTED past `max_preemptions`."""
        progress.num_preemptions += 1
        self._metrics.count_preemption()
        limit = self._config.reliability.max_preemptions
        logger.info(
            "request %s: %s after %d tokens (preemption %d, at most %d); re-prefilling",
            request_id, preempted.message, len(progress.sent), progress.num_preemptions, limit,
        )
        check_preemptions(progress.num_preemptions, limit, len(progress.sent))

    def _new_attempt(
        self,
        request: ValidatedRequest,
        sent: list[int],
        request_id: str,
        deadline: float,
        admission: Admission,
    ) -> Attempt | ColocatedAttempt:
        eos_token_ids = self._tokenizer.eos_token_ids
        admitted_at, queue = admission.admitted_at, self.wait_queue
        if self._colocated_pool is not None:
            return ColocatedAttempt(
                self._config, self._colocated_pool, eos_token_ids, request, sent, request_id,
                deadline, self._metrics, admitted_at=admitted_at, wait_queue=queue,
                reader=admission.reader,
            )
        return Attempt(
            self._config, self._pools, eos_token_ids, request, sent, request_id, deadline,
            self._metrics, admitted_at=admitted_at, wait_queue=queue, reader=admission.reader,
        )

    def _may_migrate(self, num_migrations: int) -> bool:
        reliability = self._config.reliability
        return (
            reliability.on_decode_failure == "migrate"
            and num_migrations < reliability.max_migrations
        )

    async def _refresh(self) -> None:
        """Re-polls the pools' ready replicas so the next attempt is placed on live ones."""
        pools = self._pools if self._colocated_pool is None else (self._colocated_pool,)
        await asyncio.gather(*(pool.poll_ready() for pool in pools))

    def _completion(
        self,
        request_id: str,
        request: ValidatedRequest,
        finish_reason: str,
        text: TextOutput,
        timings: dict[str, float],
        report: AttemptReport,
        progress: _Progress,
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
            num_migrations=progress.num_migrations,
            num_cached_tokens=progress.num_cached_tokens,
            num_preemptions=progress.num_preemptions,
        )


def _saying_tokens_sent(error: PdserveError, num_sent: int) -> PdserveError:
    """`error`, saying how many tokens the client got first (when it got any and the message
    does not say so yet)."""
    if not num_sent or "tokens were sent" in error.message:
        return error
    return error.with_message(f"{error.message} after {num_sent} tokens were sent")
