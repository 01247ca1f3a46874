"""ColocatedWorker with on-demand KV (fake runner, a cache of a few blocks): admission of the
prompt + a margin, decoding sequences growing a block at a time, preemption of the newest /
least important decoding sequence (never the oldest, never a prompt being prefilled), races
with abort and failed steps, and full reservations unchanged. Each test ends with the leak
oracle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from decode_worker.colocated_worker import ColocatedWorker
from engine.block_manager import BlockManager
from engine.model_runner import SequenceChunk
from pdserve.errors import StatusCode
from pdserve.messages import ColocatedEvent, ColocatedRequest, SamplingParams
from tests.factories.config import make_config
from tests.factories.fake_runner import FakeRunner, next_token
from tests.factories.waiting import until
from tests.unit.test_colocated_worker import FakeEngine

WAIT_S = 5.0
BLOCK_SIZE = 4
NUM_BLOCKS = 6


class Replica:
    def __init__(
        self, runner: FakeRunner | None = None, budget: int = 4, reservation: str = "on_demand"
    ) -> None:
        self.runner = runner or FakeRunner()
        kv_cache = {"block_size": BLOCK_SIZE, "reservation": reservation, "reserve_new_tokens": 4}
        config = make_config(
            "unused", mode="colocated",
            colocated={"max_prefill_tokens_per_step": budget, "kv_cache": kv_cache},
        )
        self.blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        engine: Any = FakeEngine(self.runner, self.blocks)
        self.worker = ColocatedWorker(config, "colocated-0", engine)

    def generate(
        self, name: str, prompt: list[int], max_tokens: int = 20, priority: int = 0
    ) -> AsyncGenerator[ColocatedEvent, None]:
        request = ColocatedRequest(
            request_id=f"r-{name}", transfer_id=name, prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            eos_token_ids=[0], deadline=time.time() + 30, priority=priority,
        )
        stream = self.worker.generate(request)
        assert isinstance(stream, AsyncGenerator)
        return stream

    @property
    def num_preemptions(self) -> int:
        return self.worker.load("node", 1).total_preemptions

    def is_quiet(self) -> bool:
        load = self.worker.load("node", 1)
        return (
            self.blocks.num_free_blocks == self.blocks.num_total_blocks
            and self.blocks.num_owners == 0 and load.num_active_requests == 0
        )


async def collect(stream: AsyncGenerator[ColocatedEvent, None]) -> list[ColocatedEvent]:
    async def drain() -> list[ColocatedEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), WAIT_S)


def tokens(events: list[ColocatedEvent]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def ends(events: list[ColocatedEvent]) -> list[ColocatedEvent]:
    return [e for e in events if e.finish_reason or e.error or e.preempted]


def recorder() -> tuple[list[tuple[int, int, int]], Callable[[SequenceChunk], int]]:
    """A `choose` recording (first token id, position, table length) of every decode chunk."""
    seen: list[tuple[int, int, int]] = []

    def choose(chunk: SequenceChunk) -> int:
        if len(chunk.token_ids) == 1 and chunk.num_cached_tokens > 0:
            seen.append((chunk.token_ids[0], chunk.num_cached_tokens, len(chunk.block_table)))
        return next_token(chunk)

    return seen, choose


async def test_admission_takes_the_prompt_and_margin_then_grows_a_block_at_a_time() -> None:
    seen, choose = recorder()
    replica = Replica(FakeRunner(choose=choose))
    stream = replica.generate("a", [1, 2, 3, 4], max_tokens=12)
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
    assert first.token_ids == [5]
    events = [first, *await collect(stream)]
    assert tokens(events) == list(range(5, 17)) and events[-1].finish_reason == "length"
    assert [(p, size) for _, p, size in seen] == [(p, p // BLOCK_SIZE + 1) for p in range(4, 15)]
    assert replica.num_preemptions == 0
    assert replica.is_quiet()


async def test_the_newest_decoding_sequence_is_preempted_and_its_stream_ends_so() -> None:
    replica = Replica()
    old, new = await asyncio.gather(
        collect(replica.generate("a", [1, 2, 3, 4])),
        collect(replica.generate("b", [101, 102, 103, 104])),
    )
    assert tokens(old) == list(range(5, 25)) and old[-1].finish_reason == "length"
    assert ends(new) == [new[-1]] and new[-1].preempted and new[-1].error is None
    assert new[-1].token_ids == [] and new[-1].decode_s > 0
    assert tokens(new) == list(range(105, 105 + len(tokens(new))))
    assert replica.num_preemptions == 1
    assert replica.is_quiet()


async def test_priority_beats_recency() -> None:
    replica = Replica()
    low, high = await asyncio.gather(
        collect(replica.generate("a", [1, 2, 3, 4], priority=1)),
        collect(replica.generate("b", [101, 102, 103, 104])),
    )
    assert low[-1].preempted
    assert tokens(high) == list(range(105, 125)) and high[-1].finish_reason == "length"
    assert replica.is_quiet()


async def test_a_stalled_reader_is_the_victim_even_when_it_is_the_oldest() -> None:
    replica = Replica()
    stalled = replica.generate("a", [1, 2, 3, 4])
    first = await asyncio.wait_for(stalled.__anext__(), WAIT_S)
    assert replica.worker.mark_reader("a", True)
    assert replica.worker.load("node", 1).num_stalled_readers == 1
    rest, reading = await asyncio.gather(
        collect(stalled), collect(replica.generate("b", [101, 102, 103, 104]))
    )
    assert [first, *rest][-1].preempted
    assert tokens(reading) == list(range(105, 125)) and reading[-1].finish_reason == "length"
    assert replica.is_quiet()


async def test_a_prompt_being_prefilled_is_never_a_victim() -> None:
    seen, choose = recorder()
    replica = Replica(FakeRunner(choose=choose), budget=1)
    # a: 2 + 4 slots, 2 blocks, needs a third at position 8. b: 12 + 4 slots fill the cache
    # and its prompt takes 12 one-token chunks, so a waits for blocks while b prefills.
    old_stream = replica.generate("a", [1, 2], max_tokens=10)
    first = await asyncio.wait_for(old_stream.__anext__(), WAIT_S)
    old = asyncio.ensure_future(collect(old_stream))
    new = await collect(replica.generate("b", list(range(100, 112))))
    assert tokens(new)[0] == 112, "b's prefill ran to its end"
    assert ends(new) == [new[-1]] and new[-1].preempted
    rest = await old
    assert tokens([first, *rest]) == list(range(3, 13)) and rest[-1].finish_reason == "length"
    positions = [p for token, p, _ in seen if token < 100 and p >= 2]  # a's decode steps
    assert positions == list(range(2, 11)), "a sat out steps, never lost a position"
    a_steps = [i for i, call in enumerate(replica.runner.calls) if call[0].token_ids[0] < 100]
    assert a_steps != list(range(a_steps[0], a_steps[0] + len(a_steps))), "a never sat out"
    assert replica.num_preemptions == 1
    assert replica.is_quiet()


async def test_an_abort_after_the_preemption_does_not_end_the_stream_twice() -> None:
    replica = Replica()
    old_stream = replica.generate("a", [1, 2, 3, 4])
    await asyncio.wait_for(old_stream.__anext__(), WAIT_S)  # admitted first: the oldest
    old = asyncio.ensure_future(collect(old_stream))
    victim = replica.generate("b", [101, 102, 103, 104])
    first = await asyncio.wait_for(victim.__anext__(), WAIT_S)  # then not pulled further
    await until(lambda: replica.num_preemptions == 1, "b's preemption")
    assert replica.worker.abort("b")
    rest = await collect(victim)
    assert ends([first, *rest]) == [rest[-1]] and rest[-1].preempted
    assert (await old)[-1].finish_reason == "length"
    assert replica.is_quiet()


async def test_a_failed_step_right_after_a_preemption_ends_each_stream_once() -> None:
    replica = Replica()
    runner = replica.runner
    forward = runner.forward

    def fail_once_b_is_gone(chunks: list[SequenceChunk]) -> Any:
        b_started = any(c.token_ids[0] >= 100 for call in runner.calls for c in call)
        if b_started and not runner.fail_calls and not replica.blocks.owns("b"):
            runner.fail_calls = {len(runner.calls) + 1}
        return forward(chunks)

    runner.forward = fail_once_b_is_gone  # type: ignore[method-assign]
    old, new = await asyncio.gather(
        collect(replica.generate("a", [1, 2, 3, 4])),
        collect(replica.generate("b", [101, 102, 103, 104])),
    )
    assert ends(new) == [new[-1]] and new[-1].preempted
    assert ends(old) == [old[-1]] and old[-1].error is not None
    assert old[-1].error.code is StatusCode.INTERNAL
    assert replica.is_quiet()


async def test_a_sequence_that_outgrows_the_whole_cache_ends_with_invalid_argument() -> None:
    replica = Replica()
    events = await collect(replica.generate("a", list(range(1, 17)), max_tokens=100))
    assert events[0].token_ids == [17]  # 16 + 4 slots: 5 blocks of the 6
    assert events[-1].error is not None
    assert events[-1].error.code is StatusCode.INVALID_ARGUMENT
    assert "25 tokens" in events[-1].error.message
    # The first token, then positions 16-23: the whole cache; position 24 would need a 7th.
    assert len(tokens(events)) == 9
    assert replica.num_preemptions == 0
    assert replica.is_quiet()


async def test_full_reservations_never_grow_nor_preempt() -> None:
    seen, choose = recorder()
    replica = Replica(FakeRunner(choose=choose), reservation="full")
    stream = replica.generate("a", [1, 2, 3, 4], max_tokens=8)  # 12 slots: 3 blocks
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
    assert replica.blocks.num_free_blocks == NUM_BLOCKS - 3
    refused = await collect(replica.generate("b", list(range(1, 9)), max_tokens=8))
    assert refused[-1].error is not None
    assert refused[-1].error.code is StatusCode.RESOURCE_EXHAUSTED
    rest = await collect(stream)
    assert tokens([first, *rest]) == list(range(5, 13))
    assert {size for _, _, size in seen} == {3}
    assert replica.num_preemptions == 0
    assert replica.is_quiet()
