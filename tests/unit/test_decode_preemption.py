"""DecodeWorker with on-demand KV (fake runner, scripted receiver, a cache of a few blocks):
sequences grow a block at a time, the newest / least important running sequence is preempted
when the cache is full and never the oldest, a sequence with no victim sits out without
spinning and resumes (or ends at its deadline), and full reservations never grow. Each test
ends with the leak oracle. Races with aborts and failed steps: test_decode_preemption_races.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from decode_worker.worker import DecodeWorker
from engine.block_manager import BlockManager
from engine.model_runner import SequenceChunk
from kvtransfer import TransferResult
from pdserve.errors import ErrorInfo, StatusCode
from pdserve.messages import DecodeEvent, DecodeRequest, ReserveRequest, SamplingParams
from pdserve.metrics import ReplicaMetrics
from tests.factories.config import make_config
from tests.factories.fake_runner import FakeRunner, next_token
from tests.factories.waiting import until
from tests.unit.test_decode_worker import FakeReceiver

WAIT_S = 5.0
BLOCK_SIZE = 4
NUM_BLOCKS = 6
PROMPT = 4  # + the 4-token margin: every reservation starts with 2 blocks


class CountingBlocks(BlockManager):
    """Counts growth checks: a loop that spins while it waits would keep calling them."""

    num_checks = 0

    def can_grow(self, owner: str, num_tokens: int) -> bool:
        self.num_checks += 1
        return super().can_grow(owner, num_tokens)


class NoKVCache:
    """The fake receiver never writes: the sink's slots are not needed."""

    def slots(self, block_table: list[int], start: int, end: int) -> None:
        return None


@dataclass
class FakeEngine:
    runner: FakeRunner
    block_manager: BlockManager
    kv_cache: NoKVCache


@dataclass
class Replica:
    worker: DecodeWorker
    blocks: CountingBlocks
    receiver: FakeReceiver
    runner: FakeRunner
    metrics: ReplicaMetrics

    def reserve(self, name: str, max_tokens: int = 20, priority: int = 0, prompt: int = PROMPT):
        request = ReserveRequest(
            f"r-{name}", name, prompt, max_tokens, deadline=time.time() + 30, priority=priority
        )
        reply = self.worker.reserve(request)
        assert reply.ok, reply.error

    def generate(
        self, name: str, first_token: int, max_tokens: int = 20, deadline_s: float = 30.0
    ) -> AsyncGenerator[DecodeEvent, None]:
        """Commits `name`'s KV and opens its stream (it joins the batch when first pulled)."""
        self.receiver.complete(name, first_token_id=first_token)
        request = DecodeRequest(
            request_id=f"r-{name}", transfer_id=name,
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            eos_token_ids=[0], deadline=time.time() + deadline_s,
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


def make_replica(
    runner: FakeRunner | None = None, reservation: str = "on_demand", num_blocks: int = NUM_BLOCKS
) -> Replica:
    runner = runner or FakeRunner()
    kv_cache = {"block_size": BLOCK_SIZE, "reservation": reservation, "reserve_new_tokens": 4}
    config = make_config("unused", decode={"kv_cache": kv_cache})
    blocks = CountingBlocks(num_blocks, BLOCK_SIZE)
    receiver = FakeReceiver()
    engine: Any = FakeEngine(runner, blocks, NoKVCache())
    metrics = ReplicaMetrics("decode-0", "decode")
    worker = DecodeWorker(config, "decode-0", engine, receiver, metrics)
    return Replica(worker, blocks, receiver, runner, metrics)


async def collect(stream: AsyncIterator[DecodeEvent]) -> list[DecodeEvent]:
    async def drain() -> list[DecodeEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), WAIT_S)


async def step_until(runner: FakeRunner, condition: Callable[[], bool], what: str) -> None:
    """Lets a held runner take one step at a time until `condition` holds."""
    while not condition():
        num_calls = len(runner.calls)
        runner.release()

        def stepped(num_calls: int = num_calls) -> bool:
            return len(runner.calls) > num_calls or condition()

        await until(stepped, what)


def tokens(events: list[DecodeEvent]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def ends(events: list[DecodeEvent]) -> list[DecodeEvent]:
    return [e for e in events if e.finish_reason or e.error or e.preempted]


def table_sizes() -> tuple[list[tuple[int, int]], Callable[[SequenceChunk], int]]:
    """A fake-runner `choose` that records (position written, table length) of every chunk."""
    seen: list[tuple[int, int]] = []

    def choose(chunk: SequenceChunk) -> int:
        seen.append((chunk.num_cached_tokens, len(chunk.block_table)))
        return next_token(chunk)

    return seen, choose


async def test_a_sequence_grows_one_block_at_a_time() -> None:
    seen, choose = table_sizes()
    replica = make_replica(FakeRunner(choose=choose))
    replica.reserve("a", max_tokens=12)
    assert replica.blocks.num_free_blocks == NUM_BLOCKS - 2, "prompt + margin only"
    events = await collect(replica.generate("a", 100, max_tokens=12))
    assert tokens(events) == list(range(101, 112))
    assert events[-1].finish_reason == "length"
    # The step writing position p holds exactly the blocks up to p's.
    assert seen == [(p, p // BLOCK_SIZE + 1) for p in range(PROMPT, PROMPT + 11)]
    assert replica.num_preemptions == 0
    assert replica.is_quiet()


async def test_the_newest_is_preempted_when_the_cache_is_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="decode_worker.kv_growth")
    replica = make_replica()
    replica.reserve("a")
    replica.reserve("b")
    old, new = await asyncio.gather(
        collect(replica.generate("a", 100)), collect(replica.generate("b", 200))
    )
    assert tokens(old) == list(range(101, 120)) and old[-1].finish_reason == "length"
    assert ends(new) == [new[-1]] and new[-1].preempted and new[-1].error is None
    assert new[-1].token_ids == [] and new[-1].decode_s > 0 and new[-1].kv_wait_s >= 0
    # Each held 3 blocks when a needed its 4th (position 12): b had reached position 10 or 11.
    assert tokens(new) == list(range(201, 201 + len(tokens(new))))
    assert len(tokens(new)) in (7, 8)
    assert replica.num_preemptions == 1
    (record,) = [r for r in caplog.records if "preempted" in r.getMessage()]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "r-b" in message and "3 blocks freed" in message
    assert f"after {1 + len(tokens(new))} generated tokens" in message
    labels = {"replica": "decode-0", "role": "decode"}
    samples = replica.metrics.registry.get_sample_value("pdserve_replica_preemptions_total", labels)
    assert samples == 1
    assert replica.is_quiet()


async def test_priority_beats_recency() -> None:
    replica = make_replica()
    replica.reserve("a", priority=1)  # admitted first, but less important
    replica.reserve("b")
    low, high = await asyncio.gather(
        collect(replica.generate("a", 100)), collect(replica.generate("b", 200))
    )
    assert low[-1].preempted
    assert tokens(high) == list(range(201, 220)) and high[-1].finish_reason == "length"
    assert replica.num_preemptions == 1
    assert replica.is_quiet()


async def test_a_stalled_reader_is_the_victim_even_when_it_is_the_oldest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="decode_worker.kv_growth")
    replica = make_replica()
    replica.reserve("a")
    replica.reserve("b")
    assert replica.worker.mark_reader("a", True)
    assert not replica.worker.mark_reader("gone", True), "an unknown transfer id is no error"
    assert replica.worker.load("node", 1).num_stalled_readers == 1
    labels = {"replica": "decode-0", "role": "decode"}
    gauge = replica.metrics.registry.get_sample_value("pdserve_replica_stalled_readers", labels)
    assert gauge == 1
    stalled, reading = await asyncio.gather(
        collect(replica.generate("a", 100)), collect(replica.generate("b", 200))
    )
    assert stalled[-1].preempted
    assert tokens(reading) == list(range(201, 220)) and reading[-1].finish_reason == "length"
    (record,) = [r for r in caplog.records if "preempted" in r.getMessage()]
    assert "r-a" in record.getMessage() and "its client not reading" in record.getMessage()
    assert replica.worker.load("node", 1).num_stalled_readers == 0
    assert replica.is_quiet()


async def test_a_reader_unmarked_again_is_served_by_age() -> None:
    replica = make_replica()
    replica.reserve("a")
    replica.reserve("b")
    replica.worker.mark_reader("a", True)
    replica.worker.mark_reader("a", False)
    old, new = await asyncio.gather(
        collect(replica.generate("a", 100)), collect(replica.generate("b", 200))
    )
    assert old[-1].finish_reason == "length" and new[-1].preempted
    assert replica.is_quiet()


async def test_the_oldest_sits_out_without_spinning_and_resumes_when_blocks_free_up() -> None:
    replica = make_replica()
    replica.reserve("a", max_tokens=12)
    replica.reserve("waiting", prompt=12)  # 4 blocks, its KV never comes: the cache is full
    task = asyncio.ensure_future(collect(replica.generate("a", 100, max_tokens=12)))
    # Positions 4-7 fit a's 2 blocks; position 8 needs a third and nothing can be preempted.
    await until(lambda: len(replica.runner.calls) == 4, "a to use its reserved blocks")
    await asyncio.sleep(0.05)
    checks = replica.blocks.num_checks
    await asyncio.sleep(0.2)
    assert replica.blocks.num_checks == checks, "the loop spins while it waits for blocks"
    assert len(replica.runner.calls) == 4 and not task.done()
    assert replica.worker.abort("waiting")  # frees its blocks and wakes the loop
    events = await task
    assert tokens(events) == list(range(101, 112)) and events[-1].finish_reason == "length"
    assert replica.num_preemptions == 0
    assert replica.is_quiet()


async def test_a_failed_transfer_wakes_the_oldest_waiting_for_its_blocks() -> None:
    replica = make_replica()
    replica.reserve("a", max_tokens=12)
    replica.reserve("waiting", prompt=12)
    task = asyncio.ensure_future(collect(replica.generate("a", 100, max_tokens=12)))
    await until(lambda: len(replica.runner.calls) == 4, "a to stall")
    _, _, on_done = replica.receiver.expected.pop("waiting")
    on_done(TransferResult("waiting", False, -1, 0, 0.0, ErrorInfo(StatusCode.DATA_LOSS, "bad")))
    events = await task
    assert events[-1].finish_reason == "length"
    assert replica.worker.abort("waiting")
    assert replica.is_quiet()


async def test_a_newer_sequence_joining_becomes_the_victim_of_a_waiting_oldest() -> None:
    replica = make_replica()
    replica.reserve("a", max_tokens=12)
    replica.reserve("b", prompt=12)
    task = asyncio.ensure_future(collect(replica.generate("a", 100, max_tokens=12)))
    await until(lambda: len(replica.runner.calls) == 4, "a to stall")
    newer = await collect(replica.generate("b", 200))  # its KV lands: it joins, a preempts it
    assert ends(newer) == [newer[-1]] and newer[-1].preempted
    assert (await task)[-1].finish_reason == "length"
    assert replica.num_preemptions == 1
    assert replica.is_quiet()


async def test_a_sequence_sitting_out_ends_at_its_deadline() -> None:
    replica = make_replica()
    replica.reserve("a", max_tokens=12)
    replica.reserve("waiting", prompt=12)
    started = time.monotonic()
    events = await collect(replica.generate("a", 100, max_tokens=12, deadline_s=0.4))
    assert events[-1].error is not None
    assert events[-1].error.code is StatusCode.DEADLINE_EXCEEDED
    assert 0.3 < time.monotonic() - started < 2.0
    assert tokens(events) == list(range(101, 105))
    assert replica.worker.abort("waiting")
    assert replica.is_quiet()


async def test_full_reservations_never_grow_nor_preempt() -> None:
    seen, choose = table_sizes()
    replica = make_replica(FakeRunner(choose=choose), reservation="full", num_blocks=12)
    replica.reserve("a", max_tokens=20)  # 24 slots: 6 blocks
    replica.reserve("b", max_tokens=20)
    assert replica.blocks.num_free_blocks == 0
    refused = replica.worker.reserve(ReserveRequest("r-c", "c", 1, 1))
    assert refused.error is not None and refused.error.code is StatusCode.RESOURCE_EXHAUSTED
    results = await asyncio.gather(
        collect(replica.generate("a", 100)), collect(replica.generate("b", 200))
    )
    assert all(events[-1].finish_reason == "length" for events in results)
    assert {size for _, size in seen} == {6}
    assert replica.blocks.num_checks == 0 and replica.num_preemptions == 0
    assert replica.is_quiet()
