"""MixedBatchLoop with a fake runner: chunked prefill within the per-step budget, decode tokens
in every step, FIFO prompts, the batch size cap, removal during a step, failed steps and
deadlines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from decode_worker.colocated_sequence import ColocatedSequence, ColocatedState
from decode_worker.mixed_batch_loop import MixedBatchLoop
from engine.model_runner import SequenceChunk
from pdserve.config import FaultsConfig
from pdserve.errors import StatusCode
from pdserve.faults import FaultInjector
from pdserve.messages import ColocatedEvent, ColocatedRequest, SamplingParams
from tests.factories.fake_runner import FAKE_VOCAB, FakeRunner
from tests.factories.waiting import until

EOS = FAKE_VOCAB - 1
WAIT_S = 5.0


class Exits(list):
    """Records `on_step_exit` calls with whether the sequence was still in a step then."""

    def __call__(self, seq: ColocatedSequence) -> None:
        self.append((seq.transfer_id, seq.in_step))


def make_loop(
    runner: FakeRunner, budget: int, max_batch_size: int = 8, exits: Exits | None = None
) -> MixedBatchLoop:
    no_faults = FaultInjector(FaultsConfig(), "test")
    on_exit = Exits() if exits is None else exits
    fake: Any = runner
    return MixedBatchLoop(fake, max_batch_size, budget, on_exit, no_faults)


def make_seq(
    name: str, prompt: list[int], max_tokens: int, deadline_s: float = 60.0,
    num_previous_tokens: int = 0,
) -> ColocatedSequence:
    request = ColocatedRequest(
        request_id=f"r-{name}", transfer_id=name, prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens), eos_token_ids=[EOS],
        deadline=time.time() + deadline_s, num_previous_tokens=num_previous_tokens,
    )
    # A distinct block table object per sequence: the fake runner's chunks are matched by it.
    return ColocatedSequence(request=request, block_table=[hash(name) % 1000])


async def events_until_end(seq: ColocatedSequence) -> list[ColocatedEvent]:
    events = [await asyncio.wait_for(seq.events.get(), WAIT_S)]
    while not (events[-1].finish_reason or events[-1].error):
        events.append(await asyncio.wait_for(seq.events.get(), WAIT_S))
    return events


def tokens(events: list[ColocatedEvent]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def chunk_of(call: list[SequenceChunk], seq: ColocatedSequence) -> SequenceChunk | None:
    found = [c for c in call if c.block_table is seq.block_table]
    assert len(found) <= 1, "a sequence appears at most once per step"
    return found[0] if found else None


def spans(runner: FakeRunner, seq: ColocatedSequence) -> list[tuple[int, int]]:
    """(num_cached_tokens, num_new_tokens) of `seq` in each step that ran it."""
    return [
        (c.num_cached_tokens, len(c.token_ids))
        for c in (chunk_of(call, seq) for call in runner.calls) if c is not None
    ]


async def test_a_short_prompt_prefills_in_one_step_then_decodes() -> None:
    runner = FakeRunner()
    loop = make_loop(runner, budget=16)
    seq = make_seq("a", [5, 6, 7], max_tokens=4)
    loop.add(seq)
    events = await events_until_end(seq)
    assert tokens(events) == [8, 9, 10, 11]
    assert [e.finish_reason for e in events] == ["", "", "", "length"]
    assert events[0].queue_s >= 0 and events[0].prefill_s > 0
    assert runner.calls[0][0].token_ids == [5, 6, 7]
    assert spans(runner, seq) == [(0, 3), (3, 1), (4, 1), (5, 1)]
    await until(lambda: loop.num_running == 0 and loop.num_waiting == 0, "the sequence to leave")
    assert (loop.num_prefill_chunks, loop.num_decode_tokens, loop.num_steps) == (1, 3, 4)


async def test_a_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    runner = FakeRunner()
    loop = make_loop(runner, budget=4)
    prompt = list(range(100, 110))
    seq = make_seq("long", prompt, max_tokens=3)
    loop.add(seq)
    events = await events_until_end(seq)
    assert tokens(events) == [110, 111, 112]
    assert spans(runner, seq) == [(0, 4), (4, 4), (8, 2), (10, 1), (11, 1)]
    # Each chunk carries exactly its slice of the prompt.
    assert [c.token_ids for call in runner.calls[:3] for c in call] == [
        prompt[0:4], prompt[4:8], prompt[8:10]
    ]
    assert loop.num_prefill_chunks == 3 and loop.num_prefill_tokens == 10


async def test_decode_tokens_run_in_every_step_while_a_long_prompt_prefills() -> None:
    runner = FakeRunner(hold=True)
    loop = make_loop(runner, budget=4)
    running = make_seq("running", [1, 2], max_tokens=12)
    loop.add(running)
    runner.release()  # step 1: its prompt
    first = await asyncio.wait_for(running.events.get(), WAIT_S)
    assert first.token_ids == [3]
    long = make_seq("long", list(range(200, 218)), max_tokens=2)  # 18 tokens: 5 chunks
    loop.add(long)
    runner.release(100)
    long_events = await events_until_end(long)
    assert tokens(long_events) == [218, 219]
    rest = await events_until_end(running)
    assert tokens([first, *rest]) == list(range(3, 15))
    prefill_steps = [
        call for call in runner.calls
        if (chunk := chunk_of(call, long)) is not None and chunk.num_cached_tokens < 18
    ]
    assert len(prefill_steps) == 5
    for call in prefill_steps:
        decode_chunk = chunk_of(call, running)
        assert decode_chunk is not None, "a prefill step left the running sequence out"
        assert len(decode_chunk.token_ids) == 1
        assert sum(len(c.token_ids) for c in call if c is not decode_chunk) <= 4
    assert spans(runner, long)[:5] == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 2)]
    assert loop.num_mixed_steps >= 5


async def test_waiting_prompts_share_the_budget_first_come_first_served() -> None:
    runner = FakeRunner(hold=True)
    loop = make_loop(runner, budget=6)
    a = make_seq("a", [10, 11, 12, 13], max_tokens=1)
    b = make_seq("b", [20, 21, 22, 23], max_tokens=1)
    c = make_seq("c", [30], max_tokens=1)
    for seq in (a, b, c):
        loop.add(seq)
    runner.release(10)
    results = [tokens(await events_until_end(seq)) for seq in (a, b, c)]
    assert results == [[14], [24], [31]]
    assert spans(runner, a) == [(0, 4)]
    assert spans(runner, b) == [(0, 2), (2, 2)]
    assert spans(runner, c) == [(0, 1)], "c fits beside b's second chunk"
    assert chunk_of(runner.calls[1], c) is not None
    assert all(sum(len(ch.token_ids) for ch in call) <= 6 for call in runner.calls)


async def test_max_batch_size_counts_decoding_and_prefilling_sequences() -> None:
    runner = FakeRunner(hold=True)
    loop = make_loop(runner, budget=64, max_batch_size=2)
    a = make_seq("a", [1], max_tokens=3)
    b = make_seq("b", [2], max_tokens=3)
    late = make_seq("late", [3], max_tokens=2)
    for seq in (a, b, late):
        loop.add(seq)
    runner.release(100)
    for seq in (a, b, late):
        await events_until_end(seq)
    assert all(len(call) <= 2 for call in runner.calls)
    # `late` waits until a or b has finished: its prompt runs in step 4, after their 3 steps.
    first_late = next(i for i, call in enumerate(runner.calls) if chunk_of(call, late))
    assert first_late == 3
    assert spans(runner, a) == [(0, 1), (1, 1), (2, 1)]


async def test_a_prompt_removed_during_its_chunk_exits_after_the_step() -> None:
    runner, exits = FakeRunner(hold=True), Exits()
    loop = make_loop(runner, budget=2, exits=exits)
    gone = make_seq("gone", [1, 2, 3, 4, 5], max_tokens=3)
    stays = make_seq("stays", [7], max_tokens=2)
    loop.add(gone)
    loop.add(stays)
    await until(lambda: len(runner.calls) == 1, "step 1")
    assert gone.in_step
    gone.state = ColocatedState.DONE  # what the worker does on abort
    loop.remove(gone)
    assert exits == [], "blocks must not be released while the step may use them"
    runner.release(100)
    await until(lambda: len(exits) == 1, "on_step_exit")
    assert exits == [("gone", False)]
    assert gone.token_ids == [] and gone.events.empty()
    assert tokens(await events_until_end(stays)) == [8, 9]
    assert spans(runner, gone) == [(0, 2)], "a removed prompt gets no more chunks"


async def test_a_failed_step_fails_prefilling_and_decoding_sequences_only() -> None:
    runner, exits = FakeRunner(hold=True), Exits()
    runner.fail_calls = {2}
    loop = make_loop(runner, budget=3, exits=exits)
    decoding = make_seq("decoding", [1], max_tokens=10)
    prefilling = make_seq("prefilling", [10, 11, 12, 13, 14, 15, 16], max_tokens=3)
    loop.add(decoding)
    await until(lambda: len(runner.calls) == 1, "step 1")
    loop.add(prefilling)  # joins step 2, beside the decode token of `decoding`
    runner.release(2)  # step 1 runs; step 2 explodes
    for seq in (decoding, prefilling):
        events = await events_until_end(seq)
        assert events[-1].error is not None and events[-1].error.code is StatusCode.INTERNAL
        assert "exploded" in events[-1].error.message
        assert not seq.in_step
    await until(lambda: loop.num_running == 0 and loop.num_waiting == 0, "both to leave")
    later = make_seq("later", [40, 41, 42, 43], max_tokens=2)
    loop.add(later)
    runner.release(10)
    assert tokens(await events_until_end(later)) == [44, 45]


async def test_a_waiting_prompt_past_its_deadline_ends_without_running() -> None:
    runner = FakeRunner()
    loop = make_loop(runner, budget=8)
    late = make_seq("late", [1, 2, 3], max_tokens=5, deadline_s=-1.0)
    loop.add(late)
    events = await events_until_end(late)
    assert events[-1].error is not None
    assert events[-1].error.code is StatusCode.DEADLINE_EXCEEDED
    assert tokens(events) == [] and runner.calls == []
    await until(lambda: loop.num_waiting == 0, "the late prompt to leave")


async def test_a_migrated_request_counts_its_earlier_tokens() -> None:
    runner = FakeRunner()
    loop = make_loop(runner, budget=2)
    # Prompt [50, 51] plus 2 tokens streamed before the migration; max_tokens 5 leaves 3.
    seq = make_seq("moved", [50, 51, 52, 53], max_tokens=5, num_previous_tokens=2)
    loop.add(seq)
    events = await events_until_end(seq)
    assert tokens(events) == [54, 55, 56]
    assert events[-1].finish_reason == "length"
    assert spans(runner, seq) == [(0, 2), (2, 2), (4, 1), (5, 1)]


async def test_eos_as_first_token_ends_the_request_at_once() -> None:
    runner = FakeRunner()
    loop = make_loop(runner, budget=8)
    seq = make_seq("eos", [EOS - 1], max_tokens=5)
    loop.add(seq)
    events = await events_until_end(seq)
    assert tokens(events) == [EOS] and events[-1].finish_reason == "stop"
    assert events[-1].prefill_s > 0
    await until(lambda: loop.num_running == 0, "the sequence to leave")
    assert len(runner.calls) == 1
