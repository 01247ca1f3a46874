"""Chunked prefill on the prefill replica (`prefill.max_chunk_tokens`): a long prompt is computed
over several passes, prompts queued behind it get their first token from the passes in between,
outputs still equal transformers' greedy `generate()`, and a request that ends between chunks
(abort, failed pass) runs no more chunks and leaks nothing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from pdserve.errors import StatusCode
from pdserve.messages import ReserveRequest
from tests.factories.prefill_pair import (
    NUM_NEW_TOKENS,
    PREFILL_BLOCK_SIZE,
    PROMPTS,
    WAIT_S,
    Pair,
    collect,
    greedy,
    output_tokens,
    prefill_request,
    serve,
    spy_on_passes,
    until,
)
from tests.unit.prefill_decode.conftest import CHUNK_TOKENS

LONG_PROMPT = PROMPTS[2]  # 21 tokens: chunks of 8, 8 and 5
SHORT_PROMPT = PROMPTS[0]


async def test_a_long_prompt_is_prefilled_in_chunks_and_matches_generate(
    chunked_pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(chunked_pair)
    prefill_events, decode_events = await serve(chunked_pair, LONG_PROMPT, greedy())
    assert passes == [[(8, 0)], [(8, 8)], [(5, 16)]]
    assert output_tokens(prefill_events, decode_events) == reference(LONG_PROMPT, NUM_NEW_TOKENS)
    assert prefill_events[-1].num_bytes == chunked_pair.layout.kv_bytes(len(LONG_PROMPT))
    assert prefill_events[0].prefill_s > 0.0
    chunked_pair.assert_quiet()


async def test_a_short_prompt_queued_behind_a_long_one_is_prefilled_before_its_last_chunk(
    chunked_pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(chunked_pair)
    first_pass_may_end = hold_first_pass(chunked_pair)
    long_task = asyncio.ensure_future(serve(chunked_pair, LONG_PROMPT, greedy()))
    await until(lambda: len(passes) == 1, "the long prompt's first chunk to start")
    short_task = asyncio.ensure_future(serve(chunked_pair, SHORT_PROMPT, greedy()))
    await until(lambda: len(chunked_pair.prefill._jobs) == 2, "the short prompt to queue")
    first_pass_may_end.set()
    short_output = output_tokens(*await asyncio.wait_for(short_task, WAIT_S))
    assert short_output == reference(SHORT_PROMPT, NUM_NEW_TOKENS)
    long_output = output_tokens(*await asyncio.wait_for(long_task, WAIT_S))
    assert long_output == reference(LONG_PROMPT, NUM_NEW_TOKENS)
    assert passes == [[(8, 0)], [(8, 8), (len(SHORT_PROMPT), 0)], [(5, 16)]]
    chunked_pair.assert_quiet()


def hold_first_pass(pair: Pair) -> threading.Event:
    """Makes the first prefill pass wait (on its thread) until the returned event is set."""
    runner = pair.prefill_engine.runner
    spied = runner.forward
    may_end = threading.Event()

    def forward(chunks, on_layer_written=None):  # type: ignore[no-untyped-def]
        logits = spied(chunks, on_layer_written=on_layer_written)
        assert may_end.wait(WAIT_S), "the test never released the first pass"
        return logits

    runner.forward = forward  # type: ignore[method-assign]
    return may_end


async def test_abort_between_chunks_runs_no_more_chunks_and_frees(chunked_pair: Pair) -> None:
    transfer_id = "aborted-mid-prompt"
    loop = asyncio.get_running_loop()
    runner = chunked_pair.prefill_engine.runner
    original = runner.forward
    num_passes = 0

    def forward_then_abort(chunks, on_layer_written=None):  # type: ignore[no-untyped-def]
        nonlocal num_passes
        num_passes += 1
        logits = original(chunks, on_layer_written=on_layer_written)
        # Runs on the event loop before the batch loop sees this pass's result.
        loop.call_soon_threadsafe(chunked_pair.prefill.abort, transfer_id)
        return logits

    runner.forward = forward_then_abort  # type: ignore[method-assign]
    assert chunked_pair.decode.reserve(ReserveRequest("r", transfer_id, len(LONG_PROMPT), 4)).ok
    request = prefill_request(chunked_pair, transfer_id, LONG_PROMPT, greedy(4))
    events = await asyncio.wait_for(collect(chunked_pair.prefill.prefill(request)), WAIT_S)
    assert [e.kind for e in events] == ["error"]
    assert events[0].error is not None and events[0].error.code is StatusCode.CANCELLED
    assert num_passes == 1
    assert chunked_pair.decode.abort(transfer_id)
    await chunked_pair.wait_quiet()


async def test_a_failed_chunk_fails_the_request_and_keeps_what_earlier_chunks_cached(
    chunked_pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    passes = spy_on_passes(chunked_pair)
    transfer_id = "bad-last-chunk"
    bad_prompt = LONG_PROMPT[:-1] + [10**6]  # the last chunk's pass raises
    assert chunked_pair.decode.reserve(ReserveRequest("r", transfer_id, len(bad_prompt), 4)).ok
    request = prefill_request(chunked_pair, transfer_id, bad_prompt, greedy(4))
    events = await asyncio.wait_for(collect(chunked_pair.prefill.prefill(request)), WAIT_S)
    assert [e.kind for e in events] == ["error"]
    assert events[0].error is not None and events[0].error.code is StatusCode.INTERNAL
    assert len(passes) == 3
    assert chunked_pair.decode.abort(transfer_id)
    await chunked_pair.wait_quiet()
    # The two chunks that succeeded wrote two full blocks of the shared prefix.
    assert chunked_pair.prefill_engine.block_manager.num_cached_blocks == 2
    prefill_events, decode_events = await serve(chunked_pair, LONG_PROMPT, greedy())
    assert passes[3] == [(len(LONG_PROMPT) - 2 * PREFILL_BLOCK_SIZE, 2 * CHUNK_TOKENS)]
    assert output_tokens(prefill_events, decode_events) == reference(LONG_PROMPT, NUM_NEW_TOKENS)
    chunked_pair.assert_quiet()
