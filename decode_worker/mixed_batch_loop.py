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
pass runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from decode_worker.colocated_sequence import ColocatedSequence, ColocatedState
from engine.model_runner import ModelRunner, SequenceChunk
from engine.sampler import SampledToken, SamplingRow, sample_tokens
from engine.stopping import finish_reason
from pdserve.errors import DeadlineExceeded, ErrorInfo, Internal, PdserveError
from pdserve.faults import FaultInjector
from pdserve.messages import ColocatedEvent
from pdserve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + num_tokens) of one sequence, run in one step."""

    seq: ColocatedSequence
    start: int
    num_tokens: int

    @property
    def is_last(self) -> bool:
        return self.start + self.num_tokens == self.seq.num_prompt_tokens


@dataclass
class StepPlan:
    decode: list[ColocatedSequence] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)

    @property
    def seqs(self) -> list[ColocatedSequence]:
        return self.decode + [chunk.seq for chunk in self.prefill]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.prefill)


class MixedBatchLoop:
    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int,
        max_prefill_tokens_per_step: int,
        on_step_exit: Callable[[ColocatedSequence], None],
        faults: FaultInjector,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self._runner = runner
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

    def add(self, seq: ColocatedSequence) -> None:
        """Queues a sequence whose blocks are allocated; its prompt runs in the next steps."""
        self._waiting[seq.transfer_id] = seq
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def remove(self, seq: ColocatedSequence) -> None:
        """Takes a sequence out of both sets (idempotent); a step running it still finishes."""
        self._waiting.pop(seq.transfer_id, None)
        self._running.pop(seq.transfer_id, None)

    async def _loop(self) -> None:
        while self._waiting or self._running:
            plan = self._plan()
            if not plan.seqs:
                continue  # every waiting prompt had expired; look again
            for seq in plan.seqs:
                seq.in_step = True
            started = time.monotonic()
            try:
                tokens = await asyncio.to_thread(self._step, plan)
            except Exception as exc:  # a failed step fails its sequences, not the replica
                logger.exception("colocated step failed for %d sequences", len(plan.seqs))
                self._fail(plan, Internal(f"colocated step failed: {exc}"))
                continue
            finally:
                for seq in plan.seqs:
                    seq.in_step = False
            self._count(plan, time.monotonic() - started)
            self._deliver(plan, tokens)

    def _plan(self) -> StepPlan:
        plan = StepPlan(decode=list(self._running.values())[: self._max_batch_size])
        for seq in plan.decode:
            # Move to the back: the next step starts with those that waited.
            self._running.pop(seq.transfer_id)
            self._running[seq.transfer_id] = seq
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
        return plan

    def _step(self, plan: StepPlan) -> list[SampledToken]:
        """Runs on a worker thread: one forward pass; returns the sampled tokens of the running
        sequences, then of the prompts whose last chunk ran, in plan order."""
        self._faults.before_decode_step([seq.fault_key for seq in plan.decode])
        self._faults.before_prefill([chunk.seq.fault_key for chunk in plan.prefill])
        chunks = [
            SequenceChunk([seq.token_ids[-1]], seq.num_context_tokens - 1, seq.block_table)
            for seq in plan.decode
        ]
        for chunk in plan.prefill:
            prompt = chunk.seq.request.prompt_token_ids
            token_ids = prompt[chunk.start : chunk.start + chunk.num_tokens]
            chunks.append(SequenceChunk(token_ids, chunk.start, chunk.seq.block_table))
        logits = self._runner.forward(chunks)
        num_decode = len(plan.decode)
        rows = list(range(num_decode))
        sampled = list(plan.decode)
        for index, chunk in enumerate(plan.prefill):
            if chunk.is_last:
                rows.append(num_decode + index)
                sampled.append(chunk.seq)
        if not rows:
            return []
        return sample_tokens(logits[rows], [_sampling_row(seq) for seq in sampled])

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
        self._emit(seq, _token_event(token))

    def _start_decoding(self, seq: ColocatedSequence, token: SampledToken) -> None:
        """The prompt's last chunk ran: stream its first token and join the running set."""
        seq.token_ids.append(token.token_id)
        seq.decode_started_at = time.monotonic()
        # num_cached_tokens stays 0: colocated replicas have no prefix cache (every prompt
        # token is computed here).
        event = dataclasses.replace(
            _token_event(token),
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


def _sampling_row(seq: ColocatedSequence) -> SamplingRow:
    request = seq.request
    return SamplingRow(request.sampling, seq.num_generated, request.eos_token_ids)


def _token_event(token: SampledToken) -> ColocatedEvent:
    """One sampled token, with its log-probabilities when the request asked for them."""
    logprobs = [token.logprobs] if token.logprobs is not None else []
    return ColocatedEvent(token_ids=[token.token_id], logprobs=logprobs)


def _deadline_error(when: str) -> ErrorInfo:
    return DeadlineExceeded(f"deadline passed {when}").to_info()
