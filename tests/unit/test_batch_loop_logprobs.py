"""Both step loops with the fake runner (`DecodeBatchLoop`, `MixedBatchLoop`): token events
carry log-probabilities aligned with their token ids only for requests that ask, and
min_tokens keeps EOS from ending a request early even when the model predicts it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from decode_worker.batch_loop import DecodeBatchLoop
from decode_worker.colocated_sequence import ColocatedSequence
from decode_worker.mixed_batch_loop import MixedBatchLoop
from decode_worker.sequence import DecodeSequence, SequenceState
from pdserve.config import FaultsConfig
from pdserve.faults import FaultInjector
from pdserve.messages import ColocatedRequest, DecodeRequest, SamplingParams
from tests.factories.fake_runner import FAKE_VOCAB, FakeRunner, fake_logits

EOS = FAKE_VOCAB - 1
WAIT_S = 5.0

Event = Any  # DecodeEvent or ColocatedEvent: the fields read here are common to both


def no_faults() -> FaultInjector:
    return FaultInjector(FaultsConfig(), "test")


def decode_seq(name: str, first_token: int, sampling: SamplingParams) -> DecodeSequence:
    request = DecodeRequest(
        request_id=f"r-{name}", transfer_id=name, sampling=sampling, eos_token_ids=[EOS],
        deadline=time.time() + 60,
    )
    return DecodeSequence(
        transfer_id=name, request_id=request.request_id, num_prompt_tokens=4,
        block_table=[hash(name) % 1000], kv_ready=asyncio.get_running_loop().create_future(),
        state=SequenceState.RUNNING, request=request, token_ids=[first_token],
    )


def colocated_seq(name: str, prompt: list[int], sampling: SamplingParams) -> ColocatedSequence:
    request = ColocatedRequest(
        request_id=f"r-{name}", transfer_id=name, prompt_token_ids=prompt, sampling=sampling,
        eos_token_ids=[EOS], deadline=time.time() + 60,
    )
    return ColocatedSequence(request=request, block_table=[hash(name) % 1000])


async def events_until_end(queue: asyncio.Queue[Event]) -> list[Event]:
    events = [await asyncio.wait_for(queue.get(), WAIT_S)]
    while not (events[-1].finish_reason or events[-1].error):
        events.append(await asyncio.wait_for(queue.get(), WAIT_S))
    return events


def tokens(events: list[Event]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def assert_aligned_logprobs(events: list[Event], top_logprobs: int) -> None:
    """Each event's logprobs match its token ids and the fake runner's distribution."""
    for event in events:
        assert [lp.token_id for lp in event.logprobs] == event.token_ids
        for found in event.logprobs:
            expected = torch.log_softmax(fake_logits(found.token_id), dim=-1)
            assert found.logprob == pytest.approx(float(expected[found.token_id]), abs=1e-6)
            assert found.top_token_ids == [found.token_id][:top_logprobs]


def with_logprobs(max_tokens: int, top_logprobs: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, logprobs=True, top_logprobs=top_logprobs)


async def test_decode_events_carry_logprobs_only_for_requests_that_ask() -> None:
    loop = DecodeBatchLoop(FakeRunner(), 8, lambda seq: None, no_faults())  # type: ignore[arg-type]
    asks = decode_seq("asks", 10, with_logprobs(max_tokens=4))
    plain = decode_seq("plain", 20, SamplingParams(max_tokens=4))
    loop.add(asks)
    loop.add(plain)
    asks_events, plain_events = await asyncio.gather(
        events_until_end(asks.events), events_until_end(plain.events)
    )
    assert tokens(asks_events) == [11, 12, 13] and tokens(plain_events) == [21, 22, 23]
    assert asks_events[-1].finish_reason == "length"
    assert_aligned_logprobs(asks_events, top_logprobs=1)
    assert all(event.logprobs for event in asks_events)
    assert all(event.logprobs == [] for event in plain_events)


async def test_decode_min_tokens_holds_back_a_predicted_eos() -> None:
    runner = FakeRunner(choose=lambda chunk: EOS)  # the model wants to stop at every step
    loop = DecodeBatchLoop(runner, 8, lambda seq: None, no_faults())  # type: ignore[arg-type]
    # The first token came from prefill: tokens 2 and 3 are masked, the 4th may be EOS.
    held = decode_seq("held", 5, SamplingParams(max_tokens=10, min_tokens=3))
    free = decode_seq("free", 5, SamplingParams(max_tokens=10))
    loop.add(held)
    loop.add(free)
    held_events, free_events = await asyncio.gather(
        events_until_end(held.events), events_until_end(free.events)
    )
    assert tokens(free_events) == [EOS] and free_events[-1].finish_reason == "stop"
    assert tokens(held_events) == [0, 0, EOS] and held_events[-1].finish_reason == "stop"


async def test_colocated_events_carry_logprobs_from_the_first_token_on() -> None:
    loop = MixedBatchLoop(
        FakeRunner(), 8, 4, lambda seq: None, no_faults()  # type: ignore[arg-type]
    )
    asks = colocated_seq("asks", [1, 2, 3, 4, 5, 6], with_logprobs(max_tokens=3, top_logprobs=0))
    plain = colocated_seq("plain", [30, 31], SamplingParams(max_tokens=3))
    loop.add(asks)
    loop.add(plain)
    asks_events, plain_events = await asyncio.gather(
        events_until_end(asks.events), events_until_end(plain.events)
    )
    assert tokens(asks_events) == [7, 8, 9] and tokens(plain_events) == [32, 33, 34]
    assert asks_events[0].prefill_s > 0, "the first event is the prefill's"
    assert_aligned_logprobs(asks_events, top_logprobs=0)
    assert all(event.logprobs for event in asks_events)
    assert all(event.logprobs == [] for event in plain_events)
    # Colocated replicas have no prefix cache: every prompt token was computed.
    assert asks_events[0].num_cached_tokens == 0


async def test_colocated_min_tokens_holds_back_a_predicted_eos() -> None:
    runner = FakeRunner(choose=lambda chunk: EOS)
    loop = MixedBatchLoop(runner, 8, 16, lambda seq: None, no_faults())  # type: ignore[arg-type]
    held = colocated_seq("held", [1, 2], SamplingParams(max_tokens=10, min_tokens=2))
    loop.add(held)
    events = await events_until_end(held.events)
    assert tokens(events) == [0, 0, EOS] and events[-1].finish_reason == "stop"
