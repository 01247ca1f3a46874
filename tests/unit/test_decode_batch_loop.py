"""DecodeBatchLoop with a fake runner: joining, leaving, removal during a step, failed steps
and the batch size cap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch

from decode_worker.batch_loop import DecodeBatchLoop
from decode_worker.sequence import DecodeSequence, SequenceState
from engine.model_runner import SequenceChunk
from pdserve.config import FaultsConfig
from pdserve.errors import StatusCode
from pdserve.faults import FaultInjector
from pdserve.messages import DecodeEvent, DecodeRequest, SamplingParams
from tests.factories.waiting import until

VOCAB = 100
EOS = 99
WAIT_S = 5.0


class FakeRunner:
    """`forward` returns logits whose argmax is `choose(chunk)` (by default the chunk's token
    plus one). With `hold=True` every forward waits for `release()`, so a test can act while a
    step is running."""

    def __init__(self, hold: bool = False, choose: Callable[[SequenceChunk], int] | None = None):
        self.calls: list[list[SequenceChunk]] = []
        self.fail_calls: set[int] = set()
        self._hold = hold
        self._allowed = threading.Semaphore(0)
        self._choose = choose or (lambda chunk: (chunk.token_ids[-1] + 1) % VOCAB)

    def release(self, num_steps: int = 1) -> None:
        for _ in range(num_steps):
            self._allowed.release()

    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        self.calls.append(list(chunks))
        call = len(self.calls)
        if self._hold and not self._allowed.acquire(timeout=WAIT_S):
            raise TimeoutError("the test never released this step")
        if call in self.fail_calls:
            raise RuntimeError(f"forward {call} exploded")
        logits = torch.zeros(len(chunks), VOCAB)
        for row, chunk in enumerate(chunks):
            logits[row, self._choose(chunk)] = 10.0
        return logits


class Exits:
    """Records `on_step_exit` calls, and whether the sequence was still in a step then."""

    def __init__(self) -> None:
        self.seqs: list[DecodeSequence] = []
        self.in_step_at_exit: list[bool] = []

    def __call__(self, seq: DecodeSequence) -> None:
        self.seqs.append(seq)
        self.in_step_at_exit.append(seq.in_step)


def make_loop(runner: FakeRunner, max_batch_size: int, exits: Exits) -> DecodeBatchLoop:
    no_faults = FaultInjector(FaultsConfig(), "test")
    return DecodeBatchLoop(runner, max_batch_size, exits, no_faults)  # type: ignore[arg-type]


_next_block = 0


def make_seq(
    name: str,
    num_prompt_tokens: int,
    first_token: int,
    max_tokens: int,
    deadline_s: float = 60.0,
) -> DecodeSequence:
    global _next_block
    num_blocks = -(-(num_prompt_tokens + max_tokens) // 4)
    block_table = list(range(_next_block, _next_block + num_blocks))
    _next_block += num_blocks
    request = DecodeRequest(
        request_id=f"r-{name}",
        transfer_id=name,
        sampling=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=[EOS],
        deadline=time.time() + deadline_s,
    )
    return DecodeSequence(
        transfer_id=name,
        request_id=request.request_id,
        num_prompt_tokens=num_prompt_tokens,
        block_table=block_table,
        kv_ready=asyncio.get_running_loop().create_future(),
        state=SequenceState.RUNNING,
        request=request,
        token_ids=[first_token],
    )


async def next_event(seq: DecodeSequence) -> DecodeEvent:
    return await asyncio.wait_for(seq.events.get(), WAIT_S)


async def events_until_end(seq: DecodeSequence) -> list[DecodeEvent]:
    events = [await next_event(seq)]
    while not (events[-1].finish_reason or events[-1].error):
        events.append(await next_event(seq))
    return events


def tokens(events: list[DecodeEvent]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def chunk_of(call: list[SequenceChunk], seq: DecodeSequence) -> SequenceChunk:
    (chunk,) = [c for c in call if c.block_table is seq.block_table]
    return chunk


def seqs_in(call: list[SequenceChunk], *seqs: DecodeSequence) -> list[str]:
    return [s.transfer_id for c in call for s in seqs if c.block_table is s.block_table]


async def test_one_sequence_runs_to_its_length() -> None:
    runner, exits = FakeRunner(), Exits()
    loop = make_loop(runner, 8, exits)
    seq = make_seq("a", num_prompt_tokens=5, first_token=10, max_tokens=4)
    loop.add(seq)
    events = await events_until_end(seq)
    assert tokens(events) == [11, 12, 13]
    assert [e.finish_reason for e in events] == ["", "", "length"]
    assert all(e.error is None for e in events)
    assert seq.token_ids == [10, 11, 12, 13]
    # Step k feeds the last token; the cache holds prompt + generated - 1 tokens.
    assert [call[0].num_cached_tokens for call in runner.calls] == [5, 6, 7]
    assert [call[0].token_ids for call in runner.calls] == [[10], [11], [12]]
    assert all(call[0].block_table is seq.block_table for call in runner.calls)
    await until(lambda: loop.num_running == 0, "the finished sequence to leave")
    assert (loop.num_steps, loop.num_step_tokens) == (3, 3)
    assert exits.seqs == []
    assert not seq.in_step


async def test_eos_finishes_with_stop() -> None:
    runner = FakeRunner(choose=lambda chunk: EOS if chunk.token_ids[-1] == 31 else 31)
    loop = make_loop(runner, 8, Exits())
    seq = make_seq("a", 3, first_token=30, max_tokens=10)
    loop.add(seq)
    events = await events_until_end(seq)
    assert tokens(events) == [31, EOS]
    assert events[-1].finish_reason == "stop"
    await until(lambda: loop.num_running == 0, "the sequence to leave")
    assert len(runner.calls) == 2


async def test_sequences_join_between_steps() -> None:
    runner = FakeRunner(hold=True)
    loop = make_loop(runner, 8, Exits())
    a = make_seq("a", 3, first_token=20, max_tokens=10)
    b = make_seq("b", 7, first_token=50, max_tokens=10)
    loop.add(a)
    await until(lambda: len(runner.calls) == 1, "step 1")
    loop.add(b)  # joins while step 1 runs: not part of it
    assert seqs_in(runner.calls[0], a, b) == ["a"]
    runner.release()
    await until(lambda: len(runner.calls) == 2, "step 2")
    step2 = runner.calls[1]
    assert sorted(seqs_in(step2, a, b)) == ["a", "b"]
    assert (chunk_of(step2, a).num_cached_tokens, chunk_of(step2, a).token_ids) == (4, [21])
    assert (chunk_of(step2, b).num_cached_tokens, chunk_of(step2, b).token_ids) == (7, [50])
    runner.release(100)
    assert tokens(await events_until_end(a)) == list(range(21, 30))
    assert tokens(await events_until_end(b)) == list(range(51, 60))


async def test_a_finished_sequence_leaves_the_batch() -> None:
    runner = FakeRunner()
    loop = make_loop(runner, 8, Exits())
    short = make_seq("short", 4, first_token=1, max_tokens=2)
    long = make_seq("long", 4, first_token=60, max_tokens=4)
    loop.add(short)
    loop.add(long)
    assert tokens(await events_until_end(short)) == [2]
    assert tokens(await events_until_end(long)) == [61, 62, 63]
    assert [sorted(seqs_in(call, short, long)) for call in runner.calls] == [
        ["long", "short"],
        ["long"],
        ["long"],
    ]
    assert [chunk_of(call, long).num_cached_tokens for call in runner.calls] == [4, 5, 6]
    assert (loop.num_steps, loop.num_step_tokens) == (3, 4)


async def test_a_sequence_removed_during_a_step_exits_after_it() -> None:
    runner, exits = FakeRunner(hold=True), Exits()
    loop = make_loop(runner, 8, exits)
    gone = make_seq("gone", 3, first_token=5, max_tokens=10)
    stays = make_seq("stays", 3, first_token=40, max_tokens=3)
    loop.add(gone)
    loop.add(stays)
    await until(lambda: len(runner.calls) == 1, "step 1")
    assert gone.in_step
    # What the worker does on abort: mark it done and take it out of the running set.
    gone.state = SequenceState.DONE
    loop.remove(gone)
    assert exits.seqs == [], "blocks must not be released while the step may use them"
    runner.release()
    await until(lambda: len(exits.seqs) == 1, "on_step_exit")
    assert exits.seqs == [gone]
    assert exits.in_step_at_exit == [False]
    assert gone.token_ids == [5] and gone.events.empty()
    runner.release(10)
    assert tokens(await events_until_end(stays)) == [41, 42]
    assert all(seqs_in(call, gone, stays) == ["stays"] for call in runner.calls[1:])
    assert exits.seqs == [gone]


async def test_a_failed_step_fails_its_sequences_and_the_loop_keeps_serving() -> None:
    runner, exits = FakeRunner(hold=True), Exits()
    runner.fail_calls = {2}
    loop = make_loop(runner, 8, exits)
    a = make_seq("a", 3, first_token=10, max_tokens=10)
    b = make_seq("b", 3, first_token=20, max_tokens=10)
    removed = make_seq("removed", 3, first_token=30, max_tokens=10)
    for seq in (a, b, removed):
        loop.add(seq)
    runner.release()  # step 1 succeeds
    await until(lambda: len(runner.calls) == 2, "step 2")
    removed.state = SequenceState.DONE
    loop.remove(removed)
    runner.release()  # step 2 raises
    for seq in (a, b):
        events = await events_until_end(seq)
        assert tokens(events) == [seq.token_ids[0] + 1]
        assert events[-1].error is not None
        assert events[-1].error.code is StatusCode.INTERNAL
        assert "exploded" in events[-1].error.message
        assert not seq.in_step
    await until(lambda: len(exits.seqs) == 1, "on_step_exit of the removed sequence")
    assert exits.seqs == [removed] and exits.in_step_at_exit == [False]
    await until(lambda: loop.num_running == 0, "the failed sequences to leave")

    later = make_seq("later", 2, first_token=70, max_tokens=3)
    loop.add(later)
    runner.release(10)
    events = await events_until_end(later)
    assert tokens(events) == [71, 72]
    assert events[-1].finish_reason == "length"
    assert all(seqs_in(call, a, b, later) == ["later"] for call in runner.calls[2:])


async def test_max_batch_size_caps_a_step_and_everyone_gets_a_turn() -> None:
    runner = FakeRunner(hold=True)
    loop = make_loop(runner, 2, Exits())
    seqs = [make_seq(name, 3, first_token=i * 20, max_tokens=5) for i, name in enumerate("abc")]
    for seq in seqs:
        loop.add(seq)
    runner.release(100)
    results = [tokens(await events_until_end(seq)) for seq in seqs]
    assert results == [[i * 20 + k for k in range(1, 5)] for i in range(3)]
    assert all(len(call) <= 2 for call in runner.calls)
    assert sorted(seqs_in(runner.calls[0], *seqs)) == ["a", "b"]
    assert "c" in seqs_in(runner.calls[1], *seqs), "the one left out must run next"
    # 3 sequences x 4 decode steps each, 2 per step.
    assert loop.num_step_tokens == 12
    assert loop.num_steps == 6
    for seq in seqs:
        calls = [call for call in runner.calls if seq.transfer_id in seqs_in(call, *seqs)]
        cached = [chunk_of(call, seq).num_cached_tokens for call in calls]
        assert cached == [3, 4, 5, 6]


async def test_a_sequence_past_its_deadline_ends_with_deadline_exceeded() -> None:
    loop = make_loop(FakeRunner(), 8, Exits())
    late = make_seq("late", 3, first_token=5, max_tokens=10, deadline_s=-1.0)
    loop.add(late)
    events = await events_until_end(late)
    assert tokens(events) == [6]
    assert events[-1].error is not None
    assert events[-1].error.code is StatusCode.DEADLINE_EXCEEDED
    await until(lambda: loop.num_running == 0, "the late sequence to leave")


@pytest.mark.parametrize("num_seqs", [1, 3])
async def test_the_loop_restarts_after_going_idle(num_seqs: int) -> None:
    runner = FakeRunner()
    loop = make_loop(runner, 8, Exits())
    first = make_seq("first", 2, first_token=1, max_tokens=2)
    loop.add(first)
    await events_until_end(first)
    await until(lambda: loop.num_running == 0, "idle")
    seqs = [make_seq(f"s{i}", 2, first_token=10 * i, max_tokens=3) for i in range(num_seqs)]
    for seq in seqs:
        loop.add(seq)
    for i, seq in enumerate(seqs):
        assert tokens(await events_until_end(seq)) == [10 * i + 1, 10 * i + 2]
