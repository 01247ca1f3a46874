"""Continuous batching with chunked prefill: the step loop of a colocated replica.

Owns two sets: the waiting prompts (FIFO, blocks already allocated by the worker) and the
running (decoding) sequences. Each step is ONE forward pass over

1. one token of every running sequence (up to `max_batch_size`, the longest-waiting first), so
   decoding is never starved by prompts; then
2. chunks of waiting prompts, head of the queue first, while the step has fewer than
   `max_batch_size` sequences and prompt tokens are left of `max_prefill_tokens_per_step`. A
   prompt longer than what is left gets a chunk now and the rest in later steps (its later
   chunks attend over the KV its earlier ones cached).

The step samples a token for every running sequence and for every prompt whose last chunk it
ran; such a prompt's first token is streamed and it joins the running set. Sequences join and
leave between steps; one removed during a step is skipped when the step returns, and
`on_step_exit` is called for it so its owner can free its blocks. Event loop only; the forward
pass runs in a worker thread (`decode_worker.mixed_step`).

With a `KVGrowth` (on-demand reservations), the running sequences of a step first get the
block their token needs, preempting running sequences when the cache is full
(`decode_worker.kv_growth`; prompts being prefilled hold their blocks from admission and are
never victims): a preempted sequence leaves the running set and its stream ends with a
`preempted` event; one that cannot grow sits the step out. When a step would be empty, the loop
sleeps until a sequence joins or leaves or the first stalled deadline passes: never a spin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from decode_worker.colocated_sequence import ColocatedSequence, ColocatedState
from decode_worker.kv_growth import KVGrowth
from decode_worker.mixed_step import PrefillChunk, StepPlan, run_step, token_event
from decode_worker.wakeup import Wakeup
from engine.model_runner import ModelRunner
from engine.sampler import SampledToken
from engine.stopping import finish_reason
from pdserve.errors import DeadlineExceeded, ErrorInfo, Internal, PdserveError
from pdserve.faults import FaultInjector
from pdserve.messages import ColocatedEvent
from pdserve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


class MixedBatchLoop:
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int,
        max_prefill_tokens_per_step: int,
        on_step_exit: Callable[[ColocatedSequence], None],
        faults: FaultInjector,
        metrics: ReplicaMetrics | None = None,
        growth: KVGrowth[ColocatedSequence] | None = None,
    ) -> None:
        """`growth` is None with `full` reservations: tables then never grow."""
        self._runner = runner
        self._growth = growth
        self._wakeup = Wakeup()
        self._max_batch_size = max_batch_size
        self._max_prefill_tokens = max_prefill_tokens_per_step
        self._on_step_exit = on_step_exit
        self._faults = faults
        self._metrics = metrics or ReplicaMetrics("", "colocated")
        # Insertion order: arrival (waiting) and how long a sequence waited for a step (running).
        self._waiting: dict[str, ColocatedSequence] = {}
        self._running: dict[str, ColocatedSequence] = {}
        self._task: asyncio.Task[None] | None = None
        self.num_steps = 0
        self.num_decode_tokens = 0
        self.num_prefill_chunks = 0
        self.num_prefill_tokens = 0
        # Steps whose forward pass carried decode tokens and prompt chunks together.
        self.num_mixed_steps = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_preemptions(self) -> int:
        return self._growth.num_preemptions if self._growth is not None else 0

    def add(self, seq: ColocatedSequence) -> None:
        """Queues a sequence whose blocks are allocated; its prompt runs in the next steps."""
        self._waiting[seq.transfer_id] = seq
        self._wakeup.notify()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def remove(self, seq: ColocatedSequence) -> None:
        """Takes a sequence out of both sets (idempotent); a step running it still finishes.
        Wakes a loop waiting for blocks: the caller frees `seq`'s blocks right after."""
        self._waiting.pop(seq.transfer_id, None)
        self._running.pop(seq.transfer_id, None)
        self._wakeup.notify()

    async def _loop(self) -> None:
        while self._waiting or self._running:
            plan, stalled = self._plan()
            if not plan.seqs:
                if stalled:
                    await self._wakeup.wait(min(seq.seconds_left() for seq in stalled))
                continue  # else every planned sequence ended (expired, preempted): look again
            for seq in plan.seqs:
                seq.in_step = True
            started = time.monotonic()
            try:
                tokens = await asyncio.to_thread(run_step, self._runner, self._faults, plan)
            except Exception as exc:  # a failed step fails its sequences, not the replica
                logger.exception("colocated step failed for %d sequences", len(plan.seqs))
                self._fail(plan, Internal(f"colocated step failed: {exc}"))
                continue
            finally:
                for seq in plan.seqs:
                    seq.in_step = False
            self._count(plan, time.monotonic() - started)
            self._deliver(plan, tokens)

    def _plan(self) -> tuple[StepPlan, list[ColocatedSequence]]:
        """The next step, and the running sequences sitting it out for want of a block."""
        decode = list(self._running.values())[: self._max_batch_size]
        for seq in decode:
            # Move to the back: the next step starts with those that waited.
            self._running.pop(seq.transfer_id)
            self._running[seq.transfer_id] = seq
        ready, stalled = self._grow(decode)
        plan = StepPlan(decode=ready)
        budget = self._max_prefill_tokens
        for seq in list(self._waiting.values()):
            if budget == 0 or len(plan.decode) + len(plan.prefill) >= self._max_batch_size:
                break
            if seq.seconds_left() <= 0:
                self._finish(seq, ColocatedEvent(error=_deadline_error("waiting for prefill")))
                continue
            num_tokens = min(seq.num_prompt_tokens_left, budget)
            if seq.num_prefilled_tokens == 0:
                seq.prefill_started_at = time.monotonic()
            plan.prefill.append(PrefillChunk(seq, seq.num_prefilled_tokens, num_tokens))
            budget -= num_tokens
        return plan, stalled

    def _grow(
        self, decode: list[ColocatedSequence]
    ) -> tuple[list[ColocatedSequence], list[ColocatedSequence]]:
        """Gives `decode` their next blocks; ends the preempted ones and those that can never
        or no longer go on. Returns the ready and the stalled sequences."""
        if self._growth is None:
            return decode, []
        grown = self._growth.plan(decode, self._running.values())
        for seq in grown.preempted:
            self._finish(seq, ColocatedEvent(preempted=True))
        for seq in grown.too_long:
            self._finish(seq, ColocatedEvent(error=self._growth.too_long_error(seq).to_info()))
        stalled = []
        for seq in grown.stalled:
            if seq.seconds_left() > 0:
                stalled.append(seq)
            else:
                self._finish(seq, ColocatedEvent(error=_deadline_error("waiting for KV blocks")))
        return grown.ready, stalled

    def _deliver(self, plan: StepPlan, sampled: list[SampledToken]) -> None:
        tokens = iter(sampled)
        for seq in plan.decode:
            self._deliver_decode(seq, next(tokens))
        for chunk in plan.prefill:
            token = next(tokens) if chunk.is_last else None
            seq = chunk.seq
            if seq.state is not ColocatedState.PREFILLING or seq.transfer_id not in self._waiting:
                self._on_step_exit(seq)
                continue
            seq.num_prefilled_tokens += chunk.num_tokens
            if token is not None:
                self._start_decoding(seq, token)

    def _deliver_decode(self, seq: ColocatedSequence, token: SampledToken) -> None:
        if seq.state is not ColocatedState.RUNNING or seq.transfer_id not in self._running:
            self._on_step_exit(seq)
            return
        try:
            self._faults.check_decode_token(seq.fault_key)
        except PdserveError as exc:  # fails this sequence only; the others go on
            self._finish(seq, ColocatedEvent(error=exc.to_info()))
            return
        seq.token_ids.append(token.token_id)
        self._emit(seq, token_event(token))

    def _start_decoding(self, seq: ColocatedSequence, token: SampledToken) -> None:
        """The prompt's last chunk ran: stream its first token and join the running set."""
        seq.token_ids.append(token.token_id)
        seq.decode_started_at = time.monotonic()
        # num_cached_tokens stays 0: colocated replicas have no prefix cache (every prompt
        # token is computed here).
        event = dataclasses.replace(
            token_event(token),
            queue_s=seq.prefill_started_at - seq.enqueued_at,
            prefill_s=seq.decode_started_at - seq.prefill_started_at,
        )
        self._waiting.pop(seq.transfer_id)
        seq.state = ColocatedState.RUNNING
        self._running[seq.transfer_id] = seq
        self._emit(seq, event)

    def _emit(self, seq: ColocatedSequence, event: ColocatedEvent) -> None:
        """Sends a token event, ending the sequence on a stop, its length or its deadline."""
        token = event.token_ids[-1]
        request = seq.request
        reason = finish_reason(token, seq.num_generated, request.sampling, request.eos_token_ids)
        if reason:
            self._finish(seq, dataclasses.replace(event, finish_reason=reason))
        elif seq.seconds_left() <= 0:
            error = _deadline_error("during decode")
            self._finish(seq, dataclasses.replace(event, error=error))
        else:
            seq.events.put_nowait(event)

    def _finish(self, seq: ColocatedSequence, event: ColocatedEvent) -> None:
        self.remove(seq)
        seq.events.put_nowait(event)

    def _fail(self, plan: StepPlan, error: Internal) -> None:
        for seq in plan.seqs:
            seq.in_step = False
            if seq.state is ColocatedState.DONE:
                self._on_step_exit(seq)
            else:
                self._finish(seq, ColocatedEvent(error=error.to_info()))

    def _count(self, plan: StepPlan, seconds: float) -> None:
        self.num_steps += 1
        self.num_decode_tokens += len(plan.decode)
        self.num_prefill_chunks += len(plan.prefill)
        self.num_prefill_tokens += plan.num_prefill_tokens
        if plan.decode and plan.prefill:
            self.num_mixed_steps += 1
        # Both histograms get the whole step's duration: it was one forward pass for both.
        if plan.decode:
            self._metrics.observe_decode_step(len(plan.decode), seconds)
        if plan.prefill:
            self._metrics.observe_prefill_pass(len(plan.prefill), plan.num_prefill_tokens, seconds)


def _deadline_error(when: str) -> ErrorInfo:
    return DeadlineExceeded(f"deadline passed {when}").to_info()
