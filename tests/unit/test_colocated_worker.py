"""ColocatedWorker alone: admission (blocks for the prompt + a margin, or + max_tokens in full
mode; refusals holding nothing), every end path freeing the blocks (finish, abort, the caller
closing the stream, deadline, failed step), and the real tiny model's chunked, mixed batches
matching transformers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from decode_worker.colocated_worker import ColocatedWorker
from engine.block_manager import BlockManager
from engine.replica_engine import build_replica_engine
from pdserve.errors import StatusCode
from pdserve.messages import ColocatedEvent, ColocatedRequest, SamplingParams
from tests.factories.config import make_config
from tests.factories.fake_runner import FakeRunner
from tests.factories.model import EOS_TOKEN_ID, build_tiny_model_dir
from tests.factories.waiting import until

WAIT_S = 10.0
BLOCK_SIZE = 4
NUM_BLOCKS = 16


@dataclass
class FakeEngine:
    runner: FakeRunner
    block_manager: BlockManager


def make_worker(
    runner: FakeRunner, budget: int = 4, num_blocks: int = NUM_BLOCKS,
    reservation: str = "on_demand", reserve_new_tokens: int = 16,
) -> tuple[ColocatedWorker, BlockManager]:
    kv_cache = {"reservation": reservation, "reserve_new_tokens": reserve_new_tokens}
    config = make_config(
        "unused", mode="colocated",
        colocated={"max_prefill_tokens_per_step": budget, "kv_cache": kv_cache},
    )
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    engine: Any = FakeEngine(runner, blocks)
    return ColocatedWorker(config, "colocated-0", engine), blocks


def request(
    transfer_id: str, prompt: list[int], max_tokens: int = 4, deadline_s: float = 30.0,
    num_previous_tokens: int = 0, ignore_eos: bool = True,
) -> ColocatedRequest:
    return ColocatedRequest(
        request_id=f"r-{transfer_id}", transfer_id=transfer_id, prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
        eos_token_ids=[EOS_TOKEN_ID],
        deadline=time.time() + deadline_s, num_previous_tokens=num_previous_tokens,
    )


async def collect(stream: AsyncIterator[ColocatedEvent]) -> list[ColocatedEvent]:
    async def drain() -> list[ColocatedEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), WAIT_S)


def tokens(events: list[ColocatedEvent]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def error_code(events: list[ColocatedEvent]) -> StatusCode | None:
    last = events[-1]
    return last.error.code if last.error is not None else None


def is_quiet(worker: ColocatedWorker, blocks: BlockManager) -> bool:
    load = worker.load("node", 1)
    return (
        blocks.num_free_blocks == blocks.num_total_blocks and blocks.num_owners == 0
        and load.num_active_requests == 0 and load.num_waiting_requests == 0
    )


async def test_a_request_runs_to_its_length_and_frees_its_blocks() -> None:
    runner = FakeRunner()
    worker, blocks = make_worker(runner, budget=4)
    stream = worker.generate(request("a", list(range(10, 20)), max_tokens=3))
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
    # 10 prompt + 3 new tokens = 13 slots = 4 blocks of 4, held from admission on.
    assert blocks.num_free_blocks == NUM_BLOCKS - 4
    assert first.token_ids == [20] and first.prefill_s > 0
    rest = await collect(stream)
    assert tokens([first, *rest]) == [20, 21, 22]
    assert rest[-1].finish_reason == "length" and rest[-1].decode_s > 0
    assert is_quiet(worker, blocks)
    report = worker.load("node", 1)
    assert report.role == "colocated"
    assert (report.total_prefill_chunks, report.total_decode_tokens) == (3, 2)


async def test_every_event_keeps_its_logprobs_the_last_one_included() -> None:
    worker, blocks = make_worker(FakeRunner(), budget=4)
    sampling = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=1)
    asks = dataclasses.replace(request("a", list(range(10, 20))), sampling=sampling)
    events = await collect(worker.generate(asks))
    assert tokens(events) == [20, 21, 22] and events[-1].decode_s > 0
    assert [lp.token_id for e in events for lp in e.logprobs] == [20, 21, 22]
    assert all(e.logprobs[0].top_token_ids == e.token_ids for e in events)
    assert events[0].num_cached_tokens == 0
    assert is_quiet(worker, blocks)


async def test_no_room_now_is_resource_exhausted_and_holds_nothing() -> None:
    runner = FakeRunner(hold=True)
    worker, blocks = make_worker(runner, num_blocks=4)
    busy = worker.generate(request("busy", list(range(1, 10)), max_tokens=4))  # 13 slots
    busy_first = asyncio.ensure_future(busy.__anext__())
    await until(lambda: len(runner.calls) == 1, "busy's first chunk")
    events = await collect(worker.generate(request("more", [1, 2, 3], max_tokens=2)))
    assert error_code(events) is StatusCode.RESOURCE_EXHAUSTED
    assert len(events) == 1 and blocks.num_owners == 1
    runner.release(100)
    assert (await asyncio.wait_for(busy_first, WAIT_S)).token_ids == [10]
    assert tokens(await collect(busy)) == [11, 12, 13]
    fits = await collect(worker.generate(request("fits", [1, 2, 3], max_tokens=2)))
    assert tokens(fits) == [4, 5]
    assert is_quiet(worker, blocks)


@pytest.mark.parametrize(
    ("reservation", "prompt_len", "max_tokens", "ok"),
    [
        ("on_demand", 12, 100, True),  # 12 + 4 margin slots: the whole cache; it grows later
        ("on_demand", 13, 100, False),
        ("on_demand", 16, 1, False),
        ("full", 12, 4, True),
        ("full", 12, 5, False),
    ],
)
async def test_a_request_beyond_the_whole_cache_is_invalid_argument(
    reservation: str, prompt_len: int, max_tokens: int, ok: bool
) -> None:
    worker, blocks = make_worker(
        FakeRunner(), num_blocks=4, reservation=reservation, reserve_new_tokens=4
    )
    events = await collect(
        worker.generate(request("r", list(range(1, prompt_len + 1)), max_tokens=max_tokens))
    )
    if ok:
        assert events[0].token_ids == [prompt_len + 1]
    else:
        assert error_code(events) is StatusCode.INVALID_ARGUMENT and len(events) == 1
        assert events[0].error is not None
        assert f"{prompt_len} prompt tokens" in events[0].error.message
        assert "whole KV cache has 4 blocks" in events[0].error.message
    assert is_quiet(worker, blocks)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "num_previous", "code"),
    [
        ([], 4, 0, StatusCode.INVALID_ARGUMENT),
        ([1, 2], 2, 2, StatusCode.INVALID_ARGUMENT),  # previous tokens must be in the prompt
        ([1, 2, 3], 2, 2, StatusCode.INVALID_ARGUMENT),  # nothing left to generate
    ],
)
async def test_impossible_requests_are_refused_holding_nothing(
    prompt: list[int], max_tokens: int, num_previous: int, code: StatusCode
) -> None:
    worker, blocks = make_worker(FakeRunner())
    events = await collect(
        worker.generate(request("bad", prompt, max_tokens, num_previous_tokens=num_previous))
    )
    assert error_code(events) is code and len(events) == 1
    assert is_quiet(worker, blocks)


async def test_a_duplicate_transfer_id_is_refused_and_the_first_goes_on() -> None:
    runner = FakeRunner(hold=True)
    worker, blocks = make_worker(runner)
    first = worker.generate(request("same", [1, 2], max_tokens=3))
    first_event = asyncio.ensure_future(first.__anext__())
    await until(lambda: len(runner.calls) == 1, "the first request's step")
    events = await collect(worker.generate(request("same", [5, 6], max_tokens=3)))
    assert error_code(events) is StatusCode.FAILED_PRECONDITION
    runner.release(10)
    assert (await asyncio.wait_for(first_event, WAIT_S)).token_ids == [3]
    assert tokens(await collect(first)) == [4, 5]
    assert is_quiet(worker, blocks)


async def test_abort_during_a_prefill_chunk_frees_the_blocks_after_the_step() -> None:
    runner = FakeRunner(hold=True)
    worker, blocks = make_worker(runner, budget=2)
    stream = worker.generate(request("a", [1, 2, 3, 4, 5, 6], max_tokens=4))
    pending = asyncio.ensure_future(stream.__anext__())
    await until(lambda: len(runner.calls) == 1, "the first chunk's step")
    assert worker.abort("a") is True
    assert blocks.num_owners == 1, "a running step still writes into the blocks"
    runner.release()
    event = await asyncio.wait_for(pending, WAIT_S)
    assert event.error is not None and event.error.code is StatusCode.CANCELLED
    await until(lambda: is_quiet(worker, blocks), "the blocks to be freed")
    assert len(runner.calls) == 1, "an aborted prompt gets no more chunks"
    assert worker.abort("a") is False


async def test_the_caller_closing_the_stream_mid_decode_frees_everything() -> None:
    runner = FakeRunner()
    worker, blocks = make_worker(runner)
    stream = worker.generate(request("a", [1, 2, 3], max_tokens=10))
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
    assert first.token_ids == [4]
    await stream.aclose()  # what a cancelled Ray stream does
    await until(lambda: is_quiet(worker, blocks), "the blocks to be freed")


async def test_a_deadline_while_waiting_for_prefill_frees_everything() -> None:
    runner = FakeRunner(hold=True)
    worker, blocks = make_worker(runner, budget=2)
    busy = worker.generate(request("busy", [1, 2, 3, 4, 5, 6], max_tokens=2))
    busy_first = asyncio.ensure_future(busy.__anext__())
    await until(lambda: len(runner.calls) == 1, "busy's first chunk")
    late = await collect(worker.generate(request("late", [7, 8], max_tokens=2, deadline_s=0.2)))
    assert error_code(late) is StatusCode.DEADLINE_EXCEEDED
    assert tokens(late) == []
    runner.release(20)
    assert (await asyncio.wait_for(busy_first, WAIT_S)).token_ids == [7]
    await collect(busy)
    await until(lambda: is_quiet(worker, blocks), "everything to be freed")
    assert all(c.token_ids != [7, 8] for call in runner.calls for c in call), "late ran"


async def test_a_failed_step_fails_its_requests_and_frees_them() -> None:
    runner = FakeRunner()
    runner.fail_calls = {1}
    worker, blocks = make_worker(runner)
    events = await collect(worker.generate(request("a", [1, 2], max_tokens=3)))
    assert error_code(events) is StatusCode.INTERNAL
    assert is_quiet(worker, blocks)
    again = await collect(worker.generate(request("b", [1, 2], max_tokens=3)))
    assert tokens(again) == [3, 4, 5]


# The real model: chunked prefill beside decode tokens gives transformers' greedy output.

PROMPTS = [list(range(30, 53)), [7, 8, 9], list(range(100, 131))]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


async def test_mixed_chunked_steps_on_the_tiny_model_match_transformers(model_dir: Path) -> None:
    config = make_config(
        str(model_dir), mode="colocated",
        colocated={"max_prefill_tokens_per_step": 8, "kv_cache": {"memory_mb": 1}},
    )
    engine = build_replica_engine(config.model, config.colocated.kv_cache, 1)
    worker = ColocatedWorker(config, "colocated-0", engine)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = [
        reference.generate(
            torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=1
        )[0, len(p):].tolist()
        for p in PROMPTS
    ]
    streams = [
        worker.generate(request(f"s{i}", prompt, max_tokens=MAX_TOKENS, ignore_eos=False))
        for i, prompt in enumerate(PROMPTS)
    ]
    results = await asyncio.gather(*(collect(stream) for stream in streams))
    assert [tokens(events) for events in results] == expected
    report = worker.load("node", 1)
    assert report.total_prefill_chunks > len(PROMPTS), "no prompt was chunked"
    assert report.total_mixed_steps > 0, "no step mixed decode tokens with prompt chunks"
    blocks = engine.block_manager
    assert blocks.num_free_blocks == blocks.num_total_blocks
