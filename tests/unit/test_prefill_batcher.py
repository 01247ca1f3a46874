"""PrefillBatcher: FIFO batches within the token/size budgets and the KV cache, no overtaking
for blocks; long prompts are computed a chunk per pass with later prompts joining those passes;
with prefix caching, jobs share cached prefix blocks and compute only their tails."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

from engine.block_manager import BlockManager
from pdserve.errors import InvalidArgument, ResourceExhausted
from pdserve.messages import KVTarget, PrefillRequest, SamplingParams
from prefill_worker.batcher import PrefillBatcher
from prefill_worker.job import PrefillJob

BLOCK_SIZE = 4


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_job(loop: asyncio.AbstractEventLoop, name: str, num_tokens: int) -> PrefillJob:
    request = PrefillRequest(
        request_id=f"r-{name}",
        transfer_id=name,
        prompt_token_ids=list(range(num_tokens)),
        sampling=SamplingParams(max_tokens=4),
        eos_token_ids=[0],
        kv_target=KVTarget("d", "inproc://0", "inproc"),
        deadline=0.0,
    )
    return PrefillJob(request, loop.create_future())


def make_batcher(
    num_blocks: int = 64,
    max_batch_tokens: int = 1000,
    max_batch_size: int = 100,
    max_waiting: int = 100,
    max_chunk_tokens: int | None = None,
) -> tuple[PrefillBatcher, BlockManager]:
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    batcher = PrefillBatcher(
        blocks, max_batch_tokens, max_batch_size, max_waiting, max_chunk_tokens=max_chunk_tokens
    )
    return batcher, blocks


def chunks(batch: list[PrefillJob]) -> list[tuple[str, int]]:
    return [(job.transfer_id, job.num_chunk_tokens) for job in batch]


def run_pass(blocks: BlockManager, batch: list[PrefillJob]) -> None:
    """What the worker does after a successful pass: advance and cache the full blocks."""
    for job in batch:
        job.num_computed_tokens += job.num_chunk_tokens
        num_full_blocks = job.num_computed_tokens // BLOCK_SIZE
        blocks.cache_blocks(job.transfer_id, job.block_hashes[:num_full_blocks])


def names(batch: list[PrefillJob]) -> list[str]:
    return [job.transfer_id for job in batch]


def submit_all(
    loop: asyncio.AbstractEventLoop, batcher: PrefillBatcher, sizes: dict[str, int]
) -> dict[str, PrefillJob]:
    jobs = {name: make_job(loop, name, n) for name, n in sizes.items()}
    for job in jobs.values():
        batcher.submit(job)
    return jobs


def test_empty_queue_gives_an_empty_batch(loop: asyncio.AbstractEventLoop) -> None:
    batcher, blocks = make_batcher()
    assert batcher.next_batch() == []
    assert blocks.num_free_blocks == 64


def test_batches_are_fifo_and_own_their_blocks(loop: asyncio.AbstractEventLoop) -> None:
    batcher, blocks = make_batcher()
    jobs = submit_all(loop, batcher, {"a": 5, "b": 1, "c": 9, "d": 4})
    assert batcher.num_waiting == 4
    batch = batcher.next_batch()
    assert names(batch) == ["a", "b", "c", "d"]
    assert batcher.num_waiting == 0
    for name, job in jobs.items():
        assert job.block_table == blocks.block_table(name)
        assert len(job.block_table) == blocks.blocks_needed(job.num_prompt_tokens)
    assert blocks.num_free_blocks == 64 - (2 + 1 + 3 + 1)


def test_passes_respect_max_batch_tokens_by_chunking_the_job_that_overflows(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_batcher(max_batch_tokens=32)
    submit_all(loop, batcher, {"a": 10, "b": 10, "c": 10, "d": 10, "e": 16, "f": 16, "g": 1})
    passes = []
    while batch := batcher.next_batch():
        assert sum(job.num_chunk_tokens for job in batch) <= 32
        passes.append(chunks(batch))
        run_pass(blocks, batch)
    assert passes == [
        [("a", 10), ("b", 10), ("c", 10), ("d", 2)],
        [("d", 8), ("e", 16), ("f", 8)],
        [("f", 8), ("g", 1)],
    ]
    assert batcher.num_waiting == 0


def test_batches_respect_max_batch_size(loop: asyncio.AbstractEventLoop) -> None:
    batcher, _ = make_batcher(max_batch_size=2)
    submit_all(loop, batcher, {name: 3 for name in "abcde"})
    assert names(batcher.next_batch()) == ["a", "b"]
    assert names(batcher.next_batch()) == ["c", "d"]
    assert names(batcher.next_batch()) == ["e"]
    assert batcher.next_batch() == []


def test_a_long_prompt_is_chunked_and_later_prompts_join_its_passes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_batcher(max_batch_tokens=16, max_chunk_tokens=8)
    jobs = submit_all(loop, batcher, {"long": 20, "short": 3})
    batch = batcher.next_batch()
    assert chunks(batch) == [("long", 8), ("short", 3)]
    assert [job.is_last_chunk for job in batch] == [False, True]
    long_table = list(jobs["long"].block_table or [])
    assert len(long_table) == blocks.blocks_needed(20), "blocks for the whole prompt at once"
    assert batcher.num_waiting == 1, "the long prompt keeps its place, the short one left"
    run_pass(blocks, batch)
    batcher.submit(jobs.setdefault("later", make_job(loop, "later", 5)))
    batch = batcher.next_batch()
    assert chunks(batch) == [("long", 8), ("later", 5)], "a prompt arriving meanwhile joins"
    run_pass(blocks, batch)
    batch = batcher.next_batch()
    assert chunks(batch) == [("long", 4)] and batch[0].is_last_chunk
    assert jobs["long"].block_table == long_table
    run_pass(blocks, batch)
    assert batcher.next_batch() == [] and batcher.num_waiting == 0


def test_a_chunked_prompt_removed_between_passes_runs_no_more(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_batcher(max_batch_tokens=8)
    jobs = submit_all(loop, batcher, {"long": 30, "next": 2})
    assert chunks(batch := batcher.next_batch()) == [("long", 8)]
    run_pass(blocks, batch)
    assert batcher.remove(jobs["long"])
    assert chunks(batcher.next_batch()) == [("next", 2)]


def test_head_job_without_blocks_stops_the_batch(loop: asyncio.AbstractEventLoop) -> None:
    batcher, blocks = make_batcher(num_blocks=10)
    blocks.allocate("hog", 8 * BLOCK_SIZE)  # 2 blocks left
    submit_all(loop, batcher, {"head": 12, "small": 1})  # head needs 3 blocks
    assert batcher.next_batch() == []
    # The small job would fit, but it must not overtake the head.
    assert batcher.num_waiting == 2
    assert blocks.num_free_blocks == 2
    assert not blocks.owns("small")
    blocks.free("hog")
    assert names(batcher.next_batch()) == ["head", "small"]


def test_a_job_without_blocks_ends_the_batch_behind_it(loop: asyncio.AbstractEventLoop) -> None:
    batcher, blocks = make_batcher(num_blocks=10)
    blocks.allocate("hog", 7 * BLOCK_SIZE)  # 3 blocks left
    submit_all(loop, batcher, {"a": 4, "big": 12, "c": 1})
    assert names(batcher.next_batch()) == ["a"]
    assert batcher.num_waiting == 2
    assert blocks.num_free_blocks == 2
    assert batcher.next_batch() == []
    blocks.free("a")
    assert names(batcher.next_batch()) == ["big"]
    assert names(batcher.next_batch()) == []  # no block left for "c" yet
    blocks.free("big")
    assert names(batcher.next_batch()) == ["c"]


def test_full_queue_raises_and_keeps_the_queue(loop: asyncio.AbstractEventLoop) -> None:
    batcher, _ = make_batcher(max_waiting=2)
    submit_all(loop, batcher, {"a": 1, "b": 1})
    with pytest.raises(ResourceExhausted):
        batcher.submit(make_job(loop, "c", 1))
    assert batcher.num_waiting == 2
    assert names(batcher.next_batch()) == ["a", "b"]
    batcher.submit(make_job(loop, "d", 1))  # room again once the queue drained
    assert batcher.num_waiting == 1


def test_a_prompt_that_can_never_fit_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    batcher, blocks = make_batcher(num_blocks=5)
    with pytest.raises(InvalidArgument, match="exceed this replica's KV cache"):
        batcher.submit(make_job(loop, "huge", 5 * BLOCK_SIZE + 1))
    assert batcher.num_waiting == 0
    batcher.submit(make_job(loop, "exact", 5 * BLOCK_SIZE))  # the whole cache is fine
    assert names(batcher.next_batch()) == ["exact"]
    assert blocks.num_free_blocks == 0


def test_remove_takes_a_waiting_job_out(loop: asyncio.AbstractEventLoop) -> None:
    batcher, blocks = make_batcher()
    jobs = submit_all(loop, batcher, {"a": 1, "b": 1, "c": 1})
    assert batcher.remove(jobs["b"])
    assert not batcher.remove(jobs["b"])
    assert batcher.num_waiting == 2
    assert names(batcher.next_batch()) == ["a", "c"]
    assert not blocks.owns("b")
    assert not batcher.remove(jobs["a"])  # already batched
    assert not batcher.remove(make_job(loop, "never", 1))


def make_caching_batcher(
    num_blocks: int = 64, max_batch_tokens: int = 1000
) -> tuple[PrefillBatcher, BlockManager]:
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    return PrefillBatcher(blocks, max_batch_tokens, 100, 100, prefix_caching=True), blocks


def make_prompt_job(
    loop: asyncio.AbstractEventLoop, name: str, prompt: list[int]
) -> PrefillJob:
    job = make_job(loop, name, 0)
    request = dataclasses.replace(job.request, prompt_token_ids=prompt)
    return PrefillJob(request, job.first_token)


def finish_pass(blocks: BlockManager, batch: list[PrefillJob]) -> None:
    """What the worker does after a successful pass."""
    for job in batch:
        blocks.cache_blocks(job.transfer_id, job.block_hashes)


SYSTEM = list(range(500, 512))  # 3 full blocks


def test_a_later_job_with_a_cached_prefix_shares_its_blocks(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_caching_batcher()
    first = make_prompt_job(loop, "first", SYSTEM + [1, 2])
    batcher.submit(first)
    assert len(first.block_hashes) == 3
    assert names(batch := batcher.next_batch()) == ["first"]
    assert first.num_cached_tokens == 0 and first.num_new_tokens == 14
    finish_pass(blocks, batch)
    second = make_prompt_job(loop, "second", SYSTEM + [3, 4, 5, 6, 7])
    batcher.submit(second)
    assert names(batcher.next_batch()) == ["second"]
    assert second.num_cached_tokens == 12 and second.num_new_tokens == 5
    assert second.block_table is not None and first.block_table is not None
    assert second.block_table[:3] == first.block_table[:3]
    assert blocks.ref_count(first.block_table[0]) == 2


def test_only_uncached_tokens_count_against_the_token_budget(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_caching_batcher(max_batch_tokens=16)
    seed = make_prompt_job(loop, "seed", SYSTEM + [1])
    batcher.submit(seed)
    finish_pass(blocks, batcher.next_batch())
    for name in "abc":  # 15 tokens each, 3 of them new
        batcher.submit(make_prompt_job(loop, name, SYSTEM + [ord(name)] * 3))
    assert names(batcher.next_batch()) == ["a", "b", "c"]


def test_a_job_waits_for_a_prefix_the_batch_is_computing(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_caching_batcher()
    jobs = [make_prompt_job(loop, name, SYSTEM + [ord(name)]) for name in "ab"]
    unrelated = make_prompt_job(loop, "c", [9] * 9)
    for job in jobs + [unrelated]:
        batcher.submit(job)
    batch = batcher.next_batch()
    assert names(batch) == ["a"], "b would recompute what a computes"
    finish_pass(blocks, batch)
    assert names(batcher.next_batch()) == ["b", "c"]
    assert jobs[1].num_cached_tokens == 12


def test_without_prefix_caching_nothing_is_hashed_or_shared(
    loop: asyncio.AbstractEventLoop,
) -> None:
    batcher, blocks = make_batcher()
    jobs = [make_prompt_job(loop, name, SYSTEM + [ord(name)]) for name in "ab"]
    for job in jobs:
        batcher.submit(job)
        assert job.block_hashes == []
        assert names(batch := batcher.next_batch()) == [job.transfer_id]
        finish_pass(blocks, batch)
        assert job.num_cached_tokens == 0
    assert blocks.num_cached_blocks == 0
    assert jobs[0].block_table is not None and jobs[1].block_table is not None
    assert not set(jobs[0].block_table) & set(jobs[1].block_table)


def test_a_prompt_behind_a_chunked_one_shares_the_blocks_its_chunks_finished(
    loop: asyncio.AbstractEventLoop,
) -> None:
    blocks = BlockManager(64, BLOCK_SIZE)
    batcher = PrefillBatcher(blocks, 100, 100, 100, prefix_caching=True, max_chunk_tokens=8)
    first = make_prompt_job(loop, "first", SYSTEM + [1, 2, 3, 4, 5])  # 17 tokens
    batcher.submit(first)
    run_pass(blocks, batcher.next_batch())  # 8 tokens: blocks 0 and 1 cached
    second = make_prompt_job(loop, "second", SYSTEM + [7])
    batcher.submit(second)
    batch = batcher.next_batch()
    assert names(batch) == ["first"], "second waits for block 2, which this pass writes"
    run_pass(blocks, batch)
    batch = batcher.next_batch()
    assert chunks(batch) == [("first", 1), ("second", 1)]
    assert second.num_cached_tokens == 12
    assert second.block_table is not None and first.block_table is not None
    assert second.block_table[:3] == first.block_table[:3]
