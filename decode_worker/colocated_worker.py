"""The colocated replica: a decode replica that also prefills (`mode: colocated`).

Life cycle of a request on a colocated replica
----------------------------------------------
1. **Admit.** The router opens `generate()` with the whole prompt (plus the tokens generated
   before a migration, or before a preemption). Blocks for the prompt plus `reserve_new_tokens`
   (or plus max_tokens with `kv_cache.reservation: full`) are allocated at once under the
   router-minted transfer id; when they are not free now, the stream's only event is
   RESOURCE_EXHAUSTED (the router then tries another replica or waits), when they exceed the
   whole cache, INVALID_ARGUMENT.
2. **Prefill.** The sequence waits in the `MixedBatchLoop`'s FIFO; its prompt runs in chunks
   inside the loop's steps, beside the running sequences' decode tokens (chunked prefill,
   bounded by `colocated.max_prefill_tokens_per_step`). The step that runs the last chunk
   samples the first token, which is streamed at once.
3. **Decode.** The sequence joins the running batch: one token per step, each streamed as a
   `ColocatedEvent`. On demand, before each step it gains the block its next token needs.
4. **Preempt** (on demand only). When a running sequence needs a block and none is free,
   running sequences are preempted by recompute: stalled readers first (`mark_reader`), then
   lowest priority, then newest; never the one served first (`decode_worker.kv_growth`; prompts
   being prefilled are never victims): the victim's
   blocks are freed at once and its stream ends with `ColocatedEvent(preempted=True)`; the
   router re-prefills prompt + generated tokens. A sequence with no victim sits steps out.
5. **Finish.** On EOS / stop id / max_tokens / deadline the sequence leaves the batch.
   `abort()` (router cancel, stop string, client gone), the router dropping the stream, the
   deadline or a failed step end it at any stage. Blocks are freed on every end path, but only
   when no step can touch them any more (the loop reports a sequence that left during a step),
   and only once: a preempted sequence's later release finds them gone. The stream ends at the
   first last-event (finish, error or preempted), whatever else races it.

No KV moves between replicas in this mode: nothing here has a lease or a transfer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from decode_worker.colocated_sequence import ColocatedSequence, ColocatedState
from decode_worker.kv_growth import KVGrowth, check_cache_can_hold, num_reserved_slots
from decode_worker.mixed_batch_loop import MixedBatchLoop
from decode_worker.sequence_table import SequenceTable
from engine.replica_engine import ReplicaEngine
from pdserve.config import PdserveConfig
from pdserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PdserveError,
)
from pdserve.faults import FaultInjector
from pdserve.futures import wait_within
from pdserve.messages import ColocatedEvent, ColocatedRequest, LoadReport
from pdserve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


class ColocatedWorker:
    """One colocated replica's requests. Event loop only (the actor's); steps run in a thread.
    Owns the replica's block accounting (`engine.block_manager`): allocates at admission, frees
    through its `SequenceTable`."""

    def __init__(
        self,
        config: PdserveConfig,
        replica_id: str,
        engine: ReplicaEngine,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._engine = engine
        self._metrics = metrics or ReplicaMetrics(replica_id, "colocated")
        self._sequences = SequenceTable[ColocatedSequence](
            engine.block_manager, ColocatedState.DONE
        )
        pool = config.colocated
        self._kv_config = pool.kv_cache
        growth = None
        if pool.kv_cache.reservation == "on_demand":
            growth = KVGrowth[ColocatedSequence](engine.block_manager, self._metrics)
        self._batch = MixedBatchLoop(
            engine.runner, pool.max_batch_size, pool.max_prefill_tokens_per_step,
            self._sequences.on_step_exit, FaultInjector(config.faults, replica_id), self._metrics,
            growth,
        )

    async def generate(self, request: ColocatedRequest) -> AsyncIterator[ColocatedEvent]:
        """Prefills and decodes one request, streaming its tokens (the first one included).

        The last event has `finish_reason`, `error` or `preempted`; a refusal (bad request, no
        room) is the only event. Whatever ends the stream, including the caller closing it,
        frees the request's blocks."""
        try:
            seq = self._admit(request)
        except PdserveError as exc:
            yield ColocatedEvent(error=exc.to_info())
            return
        try:
            self._batch.add(seq)
            while True:
                event = await self._next_event(seq)
                if event.finish_reason or event.error or event.preempted:
                    decode_s = time.monotonic() - seq.decode_started_at if seq.token_ids else 0.0
                    yield dataclasses.replace(event, decode_s=decode_s)
                    return
                yield event
        except PdserveError as exc:
            yield ColocatedEvent(error=exc.to_info())
        finally:
            self._release(seq)

    def abort(self, transfer_id: str) -> bool:
        """Ends a request at any stage (idempotent). Returns whether it was known."""
        seq = self._sequences.get(transfer_id)
        if seq is None:
            return False
        self._release(seq)
        seq.events.put_nowait(ColocatedEvent(error=Cancelled("aborted").to_info()))
        return True

    def mark_reader(self, transfer_id: str, stalled: bool) -> bool:
        """Marks (or unmarks) a request whose client is not reading its stream: while marked,
        its sequence is the first preemption victim here. Returns whether it was known."""
        return self._sequences.mark_reader(transfer_id, stalled)

    def load(self, node_id: str, pid: int, epoch: str = "") -> LoadReport:
        blocks = self._engine.block_manager
        batch = self._batch
        report = LoadReport(
            replica_id=self.replica_id, role="colocated", pid=pid, node_id=node_id,
            num_active_requests=len(self._sequences), num_waiting_requests=batch.num_waiting,
            num_free_blocks=blocks.num_free_blocks, num_total_blocks=blocks.num_total_blocks,
            total_requests=self._sequences.total_requests, epoch=epoch,
            total_decode_steps=batch.num_steps, total_decode_tokens=batch.num_decode_tokens,
            metrics_address=self._metrics.address,
            total_prefill_chunks=batch.num_prefill_chunks,
            total_mixed_steps=batch.num_mixed_steps, total_preemptions=batch.num_preemptions,
            num_stalled_readers=self._sequences.num_stalled_readers,
        )
        self._metrics.observe_load(report)
        return report

    def _admit(self, request: ColocatedRequest) -> ColocatedSequence:
        """Checks the request and allocates its blocks; raises (holding nothing) if it cannot
        be served here."""
        blocks = self._engine.block_manager
        if request.transfer_id in self._sequences or blocks.owns(request.transfer_id):
            raise FailedPrecondition(f"transfer id {request.transfer_id} is already in use")
        num_prompt_tokens = len(request.prompt_token_ids)
        num_new_tokens = request.sampling.max_tokens - request.num_previous_tokens
        if not 0 <= request.num_previous_tokens < num_prompt_tokens or num_new_tokens < 1:
            raise InvalidArgument(
                "generate", f"{num_prompt_tokens} prompt tokens ({request.num_previous_tokens} "
                f"generated before) and max_tokens {request.sampling.max_tokens} cannot be served",
            )
        if request.deadline <= time.time():
            raise DeadlineExceeded("deadline passed before the request reached the replica")
        num_slots = num_reserved_slots(self._kv_config, num_prompt_tokens, num_new_tokens)
        check_cache_can_hold(blocks, num_prompt_tokens, num_slots, "generate")
        block_table = blocks.allocate(request.transfer_id, num_slots)
        seq = ColocatedSequence(
            request=request, block_table=block_table,
            arrival_index=self._sequences.total_requests,
        )
        self._sequences.add(seq)
        return seq

    async def _next_event(self, seq: ColocatedSequence) -> ColocatedEvent:
        try:
            return await wait_within(seq.events.get(), max(0.0, seq.seconds_left()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("deadline passed on the colocated replica") from None

    def _release(self, seq: ColocatedSequence) -> None:
        seq.state = ColocatedState.DONE
        self._batch.remove(seq)
        self._sequences.release(seq)
