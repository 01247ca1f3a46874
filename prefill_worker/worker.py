"""The prefill replica: batched prompt passes, first token, KV hand-off.

Life cycle of a request on a prefill replica
--------------------------------------------
1. **Queue.** `prefill()` receives a `PrefillRequest` from the router and queues a
   `PrefillJob` (bounded queue: RESOURCE_EXHAUSTED when full).
2. **Batch.** The batch loop takes as many queued jobs as fit the token/size budget and the
   KV cache, allocates their blocks (owner = the router-minted transfer id) and runs ONE packed
   forward pass for all of them off the event loop. A prompt longer than
   `prefill.max_chunk_tokens` is computed a chunk per pass over several passes, prompts queued
   behind it joining those passes; the pass that computes a prompt's last chunk samples its
   first token.
   With `prefill.prefix_caching`, a job first takes references on the cached blocks of its
   prompt's longest cached block-aligned prefix and passes compute only the rest; once a pass
   succeeded, the full blocks it wrote are cached for later prompts.
3. **First token.** `prefill()` yields a `first_token` event. If that token already ends the
   request (EOS, stop id, max_tokens == 1) the blocks are freed and the stream ends.
4. **Lease and hand-off.** The job's KV stays in its blocks (the lease) while the `KVSender`
   streams it to the decode replica the router reserved (`kv_target`), on a send thread. With
   `kv_transfer.layer_pipelining` the send starts together with the pass and ships each layer's
   KV as soon as the pass has written it, committing with the first token once it is sampled;
   otherwise it starts after the pass. When the decode side acknowledged the commit,
   `prefill()` yields `transferred` and the blocks are freed. The lease is bounded by
   `prefill.lease_ttl_s`, the transfer timeout and the request deadline.
5. **Abort.** `abort(transfer_id)` (router), deadline expiry, a failed send or the router
   cancelling the stream end the job at whatever stage it is: it leaves the queue, or its send
   is cancelled. Blocks are freed by whoever touches them last (the batch loop after a forward
   pass, the send thread after a send), never while a pass or a send may still read them.
   Freeing drops the job's references: a cached block shared with other jobs stays theirs, and
   one nobody references stays cached until an allocation evicts it.

Threading: all state is owned by the actor's event loop; only the forward pass and the send
run in worker threads, and they touch only the blocks of jobs marked `in_forward` / `sending`.
A pass writes only its jobs' fresh blocks; cached blocks are shared read-only (they are cached
only after the pass that wrote them succeeded, and the block manager hands a block out afresh
only when no job references it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from engine.layer_progress import LayerProgress
from engine.replica_engine import ReplicaEngine
from engine.sampler import SampledToken, sample_tokens
from engine.stopping import finish_reason
from kvtransfer import KVLayout
from pdserve.config import PdserveConfig
from pdserve.errors import Cancelled, DeadlineExceeded, Internal, PdserveError
from pdserve.faults import FaultInjector
from pdserve.futures import fail_future, wait_within
from pdserve.messages import LoadReport, PrefillEvent, PrefillRequest
from pdserve.metrics import ReplicaMetrics
from prefill_worker.batcher import PrefillBatcher
from prefill_worker.hand_off import KVHandOff
from prefill_worker.job import FirstToken, PrefillJob
from prefill_worker.prefix_stats import PrefixCacheStats

logger = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(
        self,
        config: PdserveConfig,
        replica_id: str,
        engine: ReplicaEngine,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._config = config
        self._engine = engine
        self._metrics = metrics or ReplicaMetrics(replica_id, "prefill")
        layout = KVLayout(**engine.kv_layout_fields())  # type: ignore[arg-type]
        self._faults = FaultInjector(config.faults, replica_id)
        self._hand_off = KVHandOff(
            layout, engine.kv_cache, config, self._on_send_done, self._faults, self._metrics
        )
        self._pipelining = config.kv_transfer.layer_pipelining
        # Forward passes get a thread of their own: pipelined sends wait on them.
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")
        pool = config.prefill
        self._batcher = PrefillBatcher(
            engine.block_manager, pool.max_batch_tokens, pool.max_batch_size,
            pool.max_waiting_requests, prefix_caching=pool.prefix_caching,
            max_chunk_tokens=pool.max_chunk_tokens,
        )
        self._prefix_stats = PrefixCacheStats(self._metrics, replica_id)
        self._jobs: dict[str, PrefillJob] = {}
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._total_requests = 0

    async def prefill(self, request: PrefillRequest) -> AsyncIterator[PrefillEvent]:
        """Runs one request; yields `first_token`, then `transferred`, or an `error` event."""
        job = PrefillJob(request, asyncio.get_running_loop().create_future())
        if request.transfer_id in self._jobs:
            yield _error_event(Internal(f"duplicate transfer id {request.transfer_id}"))
            return
        self._jobs[request.transfer_id] = job
        self._total_requests += 1
        try:
            self._batcher.submit(job)
            self._wake_loop()
            first = await _within(job, job.first_token)
            yield PrefillEvent(
                kind="first_token", token_id=first.token_id, finished=bool(first.finish_reason),
                queue_s=first.queue_s, prefill_s=first.prefill_s, logprobs=first.logprobs,
                num_cached_tokens=job.num_cached_tokens,
            )
            if not first.finish_reason:
                yield await self._hand_off.finish(job, first.token_id)
        except PdserveError as exc:
            yield _error_event(exc)
        finally:
            self._release(job)

    def abort(self, transfer_id: str) -> bool:
        """Ends a job at any stage (idempotent). Returns whether the job was known."""
        job = self._jobs.get(transfer_id)
        if job is None:
            return False
        job.cancel.set()
        self._batcher.remove(job)
        if not job.first_token.done():
            fail_future(job.first_token, Cancelled(f"transfer {transfer_id} aborted"))
        return True

    def close(self) -> None:
        """Stops the batch loop and the worker threads (replica shutdown, tests)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._forward_pool.shutdown(wait=False, cancel_futures=True)
        self._hand_off.close()

    def load(self, node_id: str, pid: int, epoch: str = "") -> LoadReport:
        blocks = self._engine.block_manager
        report = LoadReport(
            replica_id=self.replica_id, role="prefill", pid=pid, node_id=node_id,
            num_active_requests=len(self._jobs), num_waiting_requests=self._batcher.num_waiting,
            num_free_blocks=blocks.num_free_blocks, num_total_blocks=blocks.num_total_blocks,
            num_transfers=sum(1 for j in self._jobs.values() if j.sending),
            num_leases=blocks.num_owners, total_kv_bytes=self._hand_off.total_kv_bytes,
            total_requests=self._total_requests, epoch=epoch,
            metrics_address=self._metrics.address, num_cached_blocks=blocks.num_cached_blocks,
            total_prompt_tokens=self._prefix_stats.total_prompt_tokens,
            total_cached_prompt_tokens=self._prefix_stats.total_cached_tokens,
        )
        self._metrics.observe_load(report)
        return report

    def _on_send_done(self, job: PrefillJob) -> None:
        job.sending = False
        self._free_if_idle(job)

    def _release(self, job: PrefillJob) -> None:
        job.cancel.set()
        self._batcher.remove(job)
        job.released = True
        self._jobs.pop(job.transfer_id, None)
        self._free_if_idle(job)

    def _free_if_idle(self, job: PrefillJob) -> None:
        idle = job.released and not job.in_forward and not job.sending
        if idle and self._engine.block_manager.free(job.transfer_id):
            self._wake_loop()

    def _wake_loop(self) -> None:
        self._work.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            batch = self._batcher.next_batch()
            while batch:
                await self._run_batch(batch)
                batch = self._batcher.next_batch()

    async def _run_batch(self, batch: list[PrefillJob]) -> None:
        started = time.monotonic()
        entering = [job for job in batch if not job.first_pass_at]
        self._prefix_stats.record_pass(entering, self._engine.block_manager.num_cached_blocks)
        progress = LayerProgress(self._engine.loaded.num_layers) if self._pipelining else None
        for job in batch:
            job.in_forward = True
            job.first_pass_at = job.first_pass_at or started
            if progress is not None and job.is_last_chunk:
                self._start_pipelined_send(job, progress)
        loop = asyncio.get_running_loop()
        try:
            tokens: list[SampledToken | None | PdserveError] = list(
                await loop.run_in_executor(self._forward_pool, self._forward, batch, progress)
            )
        except Exception as exc:  # a failed pass fails its batch, never the replica
            logger.exception("prefill forward failed for %d requests", len(batch))
            failure = Internal(f"prefill forward failed: {exc}")
            if progress is not None:
                progress.fail(failure)
            tokens = [failure] * len(batch)
        done_at = time.monotonic()
        self._metrics.observe_prefill_pass(
            len(batch), sum(job.num_chunk_tokens for job in batch), done_at - started
        )
        for job, token in zip(batch, tokens):
            job.in_forward = False
            job.forward_done_at = done_at
            self._after_pass(job, token)
            self._free_if_idle(job)

    def _after_pass(self, job: PrefillJob, token: SampledToken | None | PdserveError) -> None:
        """Books a pass's outcome for one job: its first token after the last chunk, an error
        for a failed pass; only a succeeded pass's blocks are cached for later prompts."""
        if isinstance(token, PdserveError):
            self._batcher.remove(job)  # a chunked prompt's remaining chunks are not run
            self._resolve(job, token)
            return
        job.num_computed_tokens += job.num_chunk_tokens
        block_size = self._engine.block_manager.block_size
        num_full_blocks = job.num_computed_tokens // block_size
        self._engine.block_manager.cache_blocks(
            job.transfer_id, job.block_hashes[:num_full_blocks]
        )
        if token is not None:
            self._resolve(job, token)

    def _start_pipelined_send(self, job: PrefillJob, progress: LayerProgress) -> None:
        first_token: concurrent.futures.Future[int] = concurrent.futures.Future()
        wait_s = job.seconds_left()
        try:
            self._hand_off.start(job, lambda: first_token.result(timeout=wait_s), progress)
        except PdserveError:
            return  # no time left: the first-token path reports it
        job.first_token_for_send = first_token

    def _forward(
        self, batch: list[PrefillJob], progress: LayerProgress | None
    ) -> list[SampledToken | None]:
        """Runs one pass over each job's current chunk; the first token of each job whose
        chunk ends its prompt, None for the others."""
        self._faults.before_prefill([job.request.prompt_token_ids for job in batch])
        on_layer = progress.layer_written if progress is not None else None
        logits = self._engine.runner.forward(
            [job.chunk for job in batch], on_layer_written=on_layer
        )
        last = [i for i, job in enumerate(batch) if job.is_last_chunk]
        if not last:
            return [None] * len(batch)
        sampled = sample_tokens(logits[last], [batch[i].sampling_row for i in last])
        tokens: list[SampledToken | None] = [None] * len(batch)
        for i, token in zip(last, sampled):
            tokens[i] = token
        return tokens

    def _resolve(self, job: PrefillJob, token: SampledToken | PdserveError) -> None:
        request = job.request
        reason = ""
        if not isinstance(token, PdserveError):
            num_generated = request.num_previous_tokens + 1
            reason = finish_reason(
                token.token_id, num_generated, request.sampling, request.eos_token_ids
            )
        if reason:
            job.cancel.set()  # a pipelined send must not commit KV nobody will decode
        if job.first_token_for_send is not None:
            if isinstance(token, PdserveError):
                job.first_token_for_send.set_exception(token)
            else:
                job.first_token_for_send.set_result(token.token_id)
        if job.first_token.done():
            return  # aborted while its pass ran
        if isinstance(token, PdserveError):
            fail_future(job.first_token, token)  # prefill() may already be gone
            return
        job.first_token.set_result(
            FirstToken(
                token.token_id, reason, queue_s=job.first_pass_at - job.enqueued_at,
                prefill_s=job.forward_done_at - job.first_pass_at, logprobs=token.logprobs,
            )
        )


async def _within(job: PrefillJob, future: asyncio.Future[FirstToken]) -> FirstToken:
    """Awaits `future` until the request's deadline."""
    try:
        return await wait_within(asyncio.shield(future), max(0.0, job.seconds_left()))
    except asyncio.TimeoutError:
        raise DeadlineExceeded("deadline passed while waiting for prefill") from None


def _error_event(error: PdserveError) -> PrefillEvent:
    return PrefillEvent(kind="error", error=error.to_info())
