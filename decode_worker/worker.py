"""The decode replica: paged KV cache, KV receiver, continuous batching.

Life cycle of a request on a decode replica
-------------------------------------------
1. **Reserve.** Before prefill starts, the router calls `reserve()`: blocks are allocated
   under the router-minted transfer id, for the prompt plus `reserve_new_tokens` (or plus
   max_tokens with `kv_cache.reservation: full`), and the `KVReceiver` is told to expect the
   transfer and write it straight into those blocks. Back-pressure comes from here:
   RESOURCE_EXHAUSTED when the blocks are not free now, INVALID_ARGUMENT when they exceed the
   whole cache. A reservation that no `generate()` claims before its deadline is freed.
2. **Receive.** The prefill replica pushes the prompt's KV; the receiver validates every chunk
   and, on commit, reports the first token (sampled by prefill). A failed transfer fails the
   request; partial KV is never used.
3. **Join.** `generate()` waits for the commit (bounded by the deadline and the KV timeout),
   then the sequence joins the running batch at the next step.
4. **Decode.** Each step of the batch loop is ONE batched forward over the running sequences
   (off the event loop); every sampled token is streamed to the router as a `DecodeEvent`.
   On demand, before each step a sequence gains the block its next token needs.
5. **Preempt** (on demand only). When a step's sequence needs a block and none is free, running
   sequences are preempted by recompute: stalled readers first (`mark_reader`), then lowest
   priority, then newest; never the one served first (`decode_worker.kv_growth`): the
   victim's blocks are freed at once and its stream ends with `DecodeEvent(preempted=True)`;
   the router re-prefills prompt + generated tokens. Sequences still waiting for their KV are
   never preempted. A sequence with no victim sits steps out.
6. **Finish.** On EOS / stop id / max_tokens / deadline the sequence leaves the batch and its
   blocks are freed. `abort()` (router cancel, stop string, client gone) or the router dropping
   the stream does the same at any stage; blocks are freed only when no step and no receiver
   write can touch them any more. Every stream ends exactly once (its first last event wins:
   finish, error or preempted, whatever races it) and every block is freed exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from decode_worker.batch_loop import DecodeBatchLoop
from decode_worker.kv_growth import KVGrowth, check_cache_can_hold, num_reserved_slots
from decode_worker.sequence import DecodeSequence, SequenceState
from decode_worker.sequence_table import SequenceTable
from engine.kv_io import PagedKVSink
from engine.replica_engine import ReplicaEngine
from engine.stopping import finish_reason
from kvtransfer import KVReceiver, TransferResult
from pdserve.config import PdserveConfig
from pdserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PdserveError,
    Unavailable,
    error_from_info,
)
from pdserve.faults import FaultInjector
from pdserve.futures import fail_future, wait_within
from pdserve.messages import DecodeEvent, DecodeRequest, LoadReport, ReserveReply, ReserveRequest
from pdserve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(
        self,
        config: PdserveConfig,
        replica_id: str,
        engine: ReplicaEngine,
        receiver: KVReceiver,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._config = config
        self._engine = engine
        self._receiver = receiver
        self._metrics = metrics or ReplicaMetrics(replica_id, "decode")
        # An `auto` receiver takes grpc and shm pushes and cannot tell which one arrived.
        configured = config.kv_transfer.transport
        self._receive_transport = "auto" if configured == "auto" else receiver.transport
        self._sequences = SequenceTable[DecodeSequence](engine.block_manager, SequenceState.DONE)
        growth = None
        if config.decode.kv_cache.reservation == "on_demand":
            growth = KVGrowth[DecodeSequence](engine.block_manager, self._metrics)
        self._batch = DecodeBatchLoop(
            engine.runner, config.decode.max_batch_size, self._sequences.on_step_exit,
            FaultInjector(config.faults, replica_id), self._metrics, growth,
        )

    @property
    def kv_address(self) -> str:
        return self._receiver.address

    def reserve(self, request: ReserveRequest) -> ReserveReply:
        """Reserves blocks for one request and arms the KV receiver for its transfer."""
        blocks = self._engine.block_manager
        if request.transfer_id in self._sequences:
            duplicate = FailedPrecondition(f"transfer id {request.transfer_id} is already reserved")
            return ReserveReply(ok=False, error=duplicate.to_info())
        if request.num_prompt_tokens < 1 or request.max_tokens < 1:
            impossible = InvalidArgument(
                "reserve", f"{request.num_prompt_tokens} prompt tokens and "
                f"{request.max_tokens} max_tokens cannot be served",
            )
            return ReserveReply(ok=False, error=impossible.to_info())
        num_slots = num_reserved_slots(
            self._config.decode.kv_cache, request.num_prompt_tokens, request.max_tokens
        )
        try:
            check_cache_can_hold(blocks, request.num_prompt_tokens, num_slots, "reserve")
            block_table = blocks.allocate(request.transfer_id, num_slots)
        except PdserveError as exc:
            return ReserveReply(ok=False, error=exc.to_info())
        try:
            self._arm(request, block_table)
        except Exception as exc:  # e.g. the receiver is stopped: hold nothing
            blocks.free(request.transfer_id)
            self._sequences.pop(request.transfer_id)
            return ReserveReply(ok=False, error=Unavailable(f"reserve: {exc}").to_info())
        return ReserveReply(ok=True, kv_address=self.kv_address)

    def _arm(self, request: ReserveRequest, block_table: list[int]) -> None:
        loop = asyncio.get_running_loop()
        seq = DecodeSequence(
            transfer_id=request.transfer_id, request_id=request.request_id,
            num_prompt_tokens=request.num_prompt_tokens, block_table=block_table,
            kv_ready=loop.create_future(), priority=request.priority,
            admitted_at=request.admitted_at, arrival_index=self._sequences.total_requests,
        )
        self._sequences.add(seq)
        sink = PagedKVSink(self._engine.kv_cache, block_table, request.num_prompt_tokens)

        def on_kv_done(result: TransferResult) -> None:  # runs on a receiver thread
            loop.call_soon_threadsafe(self._on_kv_done, result)

        self._receiver.expect(seq.transfer_id, request.num_prompt_tokens, sink, on_kv_done)
        # A reservation nobody claims (the router died) is freed once its request's deadline
        # has passed; the prefill queue may legitimately hold the request until then.
        expire_in_s = max(0.0, request.deadline - time.time()) + 1.0
        loop.call_later(expire_in_s, self._expire_unclaimed, seq)

    async def generate(self, request: DecodeRequest) -> AsyncIterator[DecodeEvent]:
        """Streams the tokens after the first one; the last event has finish_reason, error or
        preempted (its blocks were freed for older sequences: re-prefill and go on)."""
        seq = self._sequences.get(request.transfer_id)
        if seq is None or seq.request is not None:
            yield DecodeEvent(error=NotFound(f"no reservation {request.transfer_id}").to_info())
            return
        seq.request = request
        seq.state = SequenceState.AWAITING_KV
        waited_from = time.monotonic()
        try:
            first_token = await self._await_kv(seq)
            if seq.aborted:  # the abort arrived between the commit and this resumption
                raise Cancelled(f"transfer {seq.transfer_id} aborted")
            kv_wait_s = time.monotonic() - waited_from
            seq.token_ids.append(first_token)
            seq.started_at = time.monotonic()
            reason = finish_reason(
                first_token, seq.num_generated, request.sampling, request.eos_token_ids
            )
            if reason:
                yield DecodeEvent(finish_reason=reason, kv_wait_s=kv_wait_s)
                return
            seq.state = SequenceState.RUNNING
            self._batch.add(seq)
            while True:
                event = await seq.events.get()
                if event.finish_reason or event.error or event.preempted:
                    decode_s = time.monotonic() - seq.started_at
                    yield dataclasses.replace(event, kv_wait_s=kv_wait_s, decode_s=decode_s)
                    return
                yield event
        except PdserveError as exc:
            yield DecodeEvent(error=exc.to_info())
        finally:
            self._release(seq)

    def abort(self, transfer_id: str) -> bool:
        """Ends a request at any stage (idempotent). Returns whether it was known."""
        seq = self._sequences.get(transfer_id)
        if seq is None:
            return False
        seq.aborted = True
        if seq.request is None:
            self._release(seq)  # no generate() will come to clean up
            return True
        if not seq.kv_ready.done():
            fail_future(seq.kv_ready, Cancelled(f"transfer {transfer_id} aborted"))
        if seq.state is SequenceState.RUNNING:
            # Out of the batch now: no more steps, no growth, never a preemption victim.
            self._batch.remove(seq)
            seq.events.put_nowait(DecodeEvent(error=Cancelled("aborted").to_info()))
        return True

    def mark_reader(self, transfer_id: str, stalled: bool) -> bool:
        """Marks (or unmarks) a request whose client is not reading its stream: while marked,
        its sequence is the first preemption victim here. Returns whether it was known."""
        return self._sequences.mark_reader(transfer_id, stalled)

    def load(self, node_id: str, pid: int, epoch: str = "") -> LoadReport:
        blocks = self._engine.block_manager
        waiting = sum(1 for s in self._sequences.values() if s.state is not SequenceState.RUNNING)
        report = LoadReport(
            replica_id=self.replica_id, role="decode", pid=pid, node_id=node_id,
            num_active_requests=len(self._sequences), num_waiting_requests=waiting,
            num_free_blocks=blocks.num_free_blocks, num_total_blocks=blocks.num_total_blocks,
            kv_address=self.kv_address, num_transfers=self._receiver.num_pending,
            total_kv_bytes=self._receiver.total_bytes_received,
            total_requests=self._sequences.total_requests, epoch=epoch,
            total_decode_steps=self._batch.num_steps,
            total_decode_tokens=self._batch.num_step_tokens,
            metrics_address=self._metrics.address,
            total_preemptions=self._batch.num_preemptions,
            num_stalled_readers=self._sequences.num_stalled_readers,
        )
        self._metrics.observe_load(report)
        return report

    async def _await_kv(self, seq: DecodeSequence) -> int:
        timeout_s = min(self._config.kv_transfer.timeout_s, seq.seconds_left())
        try:
            return await wait_within(asyncio.shield(seq.kv_ready), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("KV transfer did not complete in time") from None

    def _on_kv_done(self, result: TransferResult) -> None:
        if result.ok:
            self._metrics.count_kv_received(self._receive_transport, result.num_bytes)
        elif result.error is not None:
            self._metrics.count_kv_transfer_failure(result.error.code.value)
        seq = self._sequences.get(result.transfer_id)
        if seq is None or seq.kv_ready.done():
            return
        if result.ok:
            seq.kv_ready.set_result(result.first_token_id)
            return
        assert result.error is not None, "a failed transfer carries its error"
        fail_future(seq.kv_ready, error_from_info(result.error))
        if seq.request is None:
            # Nobody waits yet. The receiver is done with the blocks: free them now; the record
            # stays (its error for a later generate) until abort or expiry removes it.
            self._engine.block_manager.free(seq.transfer_id)
            self._batch.wake()

    def _expire_unclaimed(self, seq: DecodeSequence) -> None:
        if seq.request is None and self._sequences.get(seq.transfer_id) is seq:
            logger.warning("reservation %s expired unclaimed", seq.transfer_id)
            self._release(seq)

    def _release(self, seq: DecodeSequence) -> None:
        # After cancel() returns the receiver writes nothing more into these blocks.
        self._receiver.cancel(seq.transfer_id)
        if not seq.kv_ready.done():
            seq.kv_ready.cancel()
        seq.state = SequenceState.DONE
        self._batch.remove(seq)
        self._sequences.release(seq)
