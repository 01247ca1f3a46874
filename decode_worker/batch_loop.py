"""Continuous batching: the running set of a decode replica and the step loop over it.

Owns the running set. Each step takes up to `max_batch_size` running sequences (the ones that
waited longest first), runs ONE batched forward (each sequence feeds its last token) in a
worker thread, samples, and hands every token to its sequence's event queue. Sequences join
and leave between steps; a sequence removed during a step is skipped when the step returns,
and `on_step_exit` is called for it so its owner can free its blocks. Event loop only.

With a `KVGrowth` (on-demand reservations), the step's sequences first get the block their
token needs, preempting others when the cache is full (`decode_worker.kv_growth`): a preempted
sequence leaves the running set and its stream ends with a `preempted` event; one that cannot
grow sits the step out. When no sequence can run, the loop sleeps until a sequence joins or
leaves, `wake()` reports freed blocks, or the first stalled deadline passes: never a spin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from decode_worker.kv_growth import KVGrowth
from decode_worker.sequence import DecodeSequence, SequenceState
from decode_worker.wakeup import Wakeup
from engine.model_runner import ModelRunner, SequenceChunk
from engine.sampler import SampledToken, SamplingRow, sample_tokens
from engine.stopping import finish_reason
from pdserve.errors import DeadlineExceeded, Internal, PdserveError
from pdserve.faults import FaultInjector
from pdserve.messages import DecodeEvent
from pdserve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


class DecodeBatchLoop:
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int,
        on_step_exit: Callable[[DecodeSequence], None],
        faults: FaultInjector,
        metrics: ReplicaMetrics | None = None,
        growth: KVGrowth[DecodeSequence] | None = None,
    ) -> None:
        """`growth` is None with `full` reservations: tables then never grow."""
        self._runner = runner
        self._metrics = metrics or ReplicaMetrics("", "decode")
        self._faults = faults
        self._max_batch_size = max_batch_size
        self._on_step_exit = on_step_exit
        self._growth = growth
        # Insertion order = how long a sequence has waited for its next step.
        self._running: dict[str, DecodeSequence] = {}
        self._task: asyncio.Task[None] | None = None
        self._wakeup = Wakeup()
        self.num_steps = 0
        self.num_step_tokens = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_preemptions(self) -> int:
        return self._growth.num_preemptions if self._growth is not None else 0

    def add(self, seq: DecodeSequence) -> None:
        self._running[seq.transfer_id] = seq
        self._wakeup.notify()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def remove(self, seq: DecodeSequence) -> None:
        """Takes `seq` out of the running set (idempotent); a step running it still finishes.
        Wakes a loop waiting for blocks: the caller frees `seq`'s blocks right after."""
        self._running.pop(seq.transfer_id, None)
        self._wakeup.notify()

    def wake(self) -> None:
        """Tells a loop waiting for blocks that some were freed outside it (the worker calls
        it when a failed transfer frees a reservation's blocks)."""
        self._wakeup.notify()

    async def _loop(self) -> None:
        while self._running:
            batch, stalled = self._next_batch()
            if not batch:
                if stalled:
                    await self._wakeup.wait(min(seq.seconds_left() for seq in stalled))
                continue  # else everything planned was preempted or ended: plan again
            for seq in batch:
                seq.in_step = True
            started = time.monotonic()
            try:
                tokens = await asyncio.to_thread(self._step, batch)
            except Exception as exc:  # a failed step fails its sequences, not the replica
                logger.exception("decode step failed for %d sequences", len(batch))
                self._fail(batch, Internal(f"decode step failed: {exc}"))
                continue
            finally:
                for seq in batch:
                    seq.in_step = False
            self.num_steps += 1
            self.num_step_tokens += len(batch)
            self._metrics.observe_decode_step(len(batch), time.monotonic() - started)
            self._deliver(batch, tokens)

    def _next_batch(self) -> tuple[list[DecodeSequence], list[DecodeSequence]]:
        """The sequences of the next step, with their blocks, and those sitting it out."""
        batch = list(self._running.values())[: self._max_batch_size]
        for seq in batch:
            # Move to the back: the next step starts with those that waited.
            self._running.pop(seq.transfer_id)
            self._running[seq.transfer_id] = seq
        if self._growth is None:
            return batch, []
        plan = self._growth.plan(batch, self._running.values())
        for seq in plan.preempted:
            self._finish(seq, DecodeEvent(preempted=True))
        for seq in plan.too_long:
            error = self._growth.too_long_error(seq).to_info()
            self._finish(seq, DecodeEvent(error=error))
        stalled = []
        for seq in plan.stalled:
            if seq.seconds_left() > 0:
                stalled.append(seq)
            else:  # the router is waiting on this stream: it gets its end at the deadline
                error = DeadlineExceeded("deadline passed waiting for KV blocks").to_info()
                self._finish(seq, DecodeEvent(error=error))
        return plan.ready, stalled

    def _step(self, batch: list[DecodeSequence]) -> list[SampledToken]:
        self._faults.before_decode_step([seq.fault_key for seq in batch])
        chunks = [
            SequenceChunk([seq.token_ids[-1]], seq.num_context_tokens - 1, seq.block_table)
            for seq in batch
        ]
        logits = self._runner.forward(chunks)
        return sample_tokens(logits, [_sampling_row(seq) for seq in batch])

    def _deliver(self, batch: list[DecodeSequence], tokens: list[SampledToken]) -> None:
        now = time.time()
        for seq, sampled in zip(batch, tokens):
            if seq.state is not SequenceState.RUNNING or seq.transfer_id not in self._running:
                self._on_step_exit(seq)  # released or aborted during the step
                continue
            assert seq.request is not None, "running sequences are attached"
            try:
                self._faults.check_decode_token(seq.fault_key)
            except PdserveError as exc:  # fails this sequence only; the others go on
                self._finish(seq, DecodeEvent(error=exc.to_info()))
                continue
            token = sampled.token_id
            seq.token_ids.append(token)
            logprobs = [sampled.logprobs] if sampled.logprobs is not None else []
            reason = finish_reason(
                token, seq.num_generated, seq.request.sampling, seq.request.eos_token_ids
            )
            if reason:
                event = DecodeEvent(token_ids=[token], finish_reason=reason, logprobs=logprobs)
                self._finish(seq, event)
            elif now > seq.request.deadline:
                error = DeadlineExceeded("deadline passed during decode").to_info()
                self._finish(seq, DecodeEvent(token_ids=[token], error=error, logprobs=logprobs))
            else:
                seq.events.put_nowait(DecodeEvent(token_ids=[token], logprobs=logprobs))

    def _finish(self, seq: DecodeSequence, event: DecodeEvent) -> None:
        self.remove(seq)
        seq.events.put_nowait(event)

    def _fail(self, batch: list[DecodeSequence], error: Internal) -> None:
        for seq in batch:
            seq.in_step = False
            if seq.state is SequenceState.RUNNING and seq.transfer_id in self._running:
                self._finish(seq, DecodeEvent(error=error.to_info()))
            else:
                self._on_step_exit(seq)


def _sampling_row(seq: DecodeSequence) -> SamplingRow:
    assert seq.request is not None, "only attached sequences join the batch"
    request = seq.request
    return SamplingRow(request.sampling, seq.num_generated, request.eos_token_ids)
