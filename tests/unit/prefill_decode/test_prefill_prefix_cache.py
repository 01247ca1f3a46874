"""Prefix caching on the prefill replica, end to end with a decode worker: a repeated prefix is
computed once (a spy on the runner records what each pass got), outputs still equal
transformers' greedy `generate()`, and cached blocks never leak or outlive a failed pass."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pdserve.messages import ReserveRequest
from tests.factories.prefill_pair import (
    NUM_NEW_TOKENS,
    PREFILL_BLOCK_SIZE,
    SUFFIXES,
    SYSTEM_PROMPT,
    WAIT_S,
    Pair,
    cached_tokens_of,
    collect,
    greedy,
    output_tokens,
    prefill_request,
    serve,
    spy_on_passes,
)


async def test_a_repeated_prefix_is_computed_once_and_outputs_still_match(
    pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(pair)
    prompts = [SYSTEM_PROMPT + suffix for suffix in SUFFIXES]
    for prompt in prompts:
        prefill_events, decode_events = await serve(pair, prompt, greedy())
        assert output_tokens(prefill_events, decode_events) == reference(prompt, NUM_NEW_TOKENS)
        # The decode side got the whole prompt's KV, cached prefix included.
        assert prefill_events[-1].num_bytes == pair.layout.kv_bytes(len(prompt))
    num_cached = cached_tokens_of(SYSTEM_PROMPT)
    assert passes == [
        [(len(prompts[0]), 0)],
        [(len(prompts[1]) - num_cached, num_cached)],
        [(len(prompts[2]) - num_cached, num_cached)],
    ]
    pair.assert_quiet()
    load = pair.prefill.load("n", 1)
    assert load.total_prompt_tokens == sum(len(p) for p in prompts)
    assert load.total_cached_prompt_tokens == 2 * num_cached
    assert load.num_cached_blocks > 0
    registry = pair.prefill._metrics.registry
    labels = {"replica": "prefill-0", "role": "prefill"}
    assert registry.get_sample_value("pdserve_prefix_cache_hits_total", labels) == 2 * num_cached
    assert registry.get_sample_value(
        "pdserve_prefix_cache_prompt_tokens_total", labels
    ) == load.total_prompt_tokens


async def test_a_whole_repeated_prompt_still_computes_its_last_token(
    pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(pair)
    prompt = SYSTEM_PROMPT[: 4 * PREFILL_BLOCK_SIZE]  # block-aligned
    for _ in range(2):
        assert output_tokens(*await serve(pair, prompt, greedy())) == reference(
            prompt, NUM_NEW_TOKENS
        )
    assert passes[1] == [(PREFILL_BLOCK_SIZE, 3 * PREFILL_BLOCK_SIZE)]
    pair.assert_quiet()


async def test_concurrent_requests_with_a_shared_prefix_each_match(
    pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(pair)
    prompts = [SYSTEM_PROMPT + suffix for suffix in SUFFIXES]
    results = await asyncio.gather(*(serve(pair, prompt, greedy()) for prompt in prompts))
    for prompt, (prefill_events, decode_events) in zip(prompts, results):
        assert output_tokens(prefill_events, decode_events) == reference(prompt, NUM_NEW_TOKENS)
    pair.assert_quiet()
    # However the requests were batched, the system prompt was computed only once.
    num_computed = sum(num_new for one_pass in passes for num_new, _ in one_pass)
    num_cached = cached_tokens_of(SYSTEM_PROMPT)
    assert num_computed == sum(len(p) for p in prompts) - 2 * num_cached


async def test_without_prefix_caching_every_pass_computes_the_whole_prompt(
    uncached_pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(uncached_pair)
    prompts = [SYSTEM_PROMPT + suffix for suffix in SUFFIXES[:2]]
    for prompt in prompts:
        output = output_tokens(*await serve(uncached_pair, prompt, greedy()))
        assert output == reference(prompt, NUM_NEW_TOKENS)
    assert passes == [[(len(prompts[0]), 0)], [(len(prompts[1]), 0)]]
    uncached_pair.assert_quiet()
    load = uncached_pair.prefill.load("n", 1)
    assert load.num_cached_blocks == 0 and load.total_cached_prompt_tokens == 0


async def test_a_failed_pass_leaves_nothing_cached(pair: Pair) -> None:
    passes = spy_on_passes(pair)
    transfer_id = "bad-prefix"
    assert pair.decode.reserve(ReserveRequest("r", transfer_id, len(SYSTEM_PROMPT) + 1, 4)).ok
    # The bad id sits in the last (partial) block: the full blocks before it look cacheable.
    request = prefill_request(pair, transfer_id, SYSTEM_PROMPT + [10**6], greedy(4))
    events = await asyncio.wait_for(collect(pair.prefill.prefill(request)), WAIT_S)
    assert [e.kind for e in events] == ["error"]
    assert pair.decode.abort(transfer_id)
    await pair.wait_quiet()
    assert pair.prefill_engine.block_manager.num_cached_blocks == 0
    prompt = SYSTEM_PROMPT + [5]
    prefill_events, _ = await serve(pair, prompt, greedy(3))
    assert prefill_events[-1].kind == "transferred"
    assert passes[-1] == [(len(prompt), 0)]
    pair.assert_quiet()


async def test_cached_blocks_are_evicted_when_the_cache_needs_them(pair: Pair) -> None:
    blocks = pair.prefill_engine.block_manager
    await serve(pair, SYSTEM_PROMPT + [1], greedy(2))
    assert blocks.num_cached_blocks > 0 and blocks.num_free_blocks == blocks.num_total_blocks
    # Every block, cached ones included, can still be taken.
    blocks.allocate("hog", blocks.num_total_blocks * blocks.block_size)
    assert blocks.num_cached_blocks == 0
    blocks.free("hog")
    passes = spy_on_passes(pair)
    await serve(pair, SYSTEM_PROMPT + [2], greedy(2))
    assert passes == [[(len(SYSTEM_PROMPT) + 1, 0)]]
    pair.assert_quiet()
