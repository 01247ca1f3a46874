"""One step of a colocated replica: what it runs (`StepPlan`) and its forward pass.

`MixedBatchLoop` plans a step on the event loop and hands it to `run_step` on a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from decode_worker.colocated_sequence import ColocatedSequence
from engine.model_runner import ModelRunner, SequenceChunk
from engine.sampler import SampledToken, SamplingRow, sample_tokens
from pdserve.faults import FaultInjector
from pdserve.messages import ColocatedEvent


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


def run_step(runner: ModelRunner, faults: FaultInjector, plan: StepPlan) -> list[SampledToken]:
    """Runs on a worker thread: one forward pass; returns the sampled tokens of the running
    sequences, then of the prompts whose last chunk ran, in plan order. Raises whatever the
    forward pass or an injected fault raises."""
    faults.before_decode_step([seq.fault_key for seq in plan.decode])
    faults.before_prefill([chunk.seq.fault_key for chunk in plan.prefill])
    chunks = [
        SequenceChunk([seq.token_ids[-1]], seq.num_context_tokens - 1, seq.block_table)
        for seq in plan.decode
    ]
    for chunk in plan.prefill:
        prompt = chunk.seq.request.prompt_token_ids
        token_ids = prompt[chunk.start : chunk.start + chunk.num_tokens]
        chunks.append(SequenceChunk(token_ids, chunk.start, chunk.seq.block_table))
    logits = runner.forward(chunks)
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


def token_event(token: SampledToken) -> ColocatedEvent:
    """One sampled token, with its log-probabilities when the request asked for them."""
    logprobs = [token.logprobs] if token.logprobs is not None else []
    return ColocatedEvent(token_ids=[token.token_id], logprobs=logprobs)


def _sampling_row(seq: ColocatedSequence) -> SamplingRow:
    request = seq.request
    return SamplingRow(request.sampling, seq.num_generated, request.eos_token_ids)
