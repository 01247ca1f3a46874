"""PrefillWorker and DecodeWorker together in one process (see tests/factories/prefill_pair.py):
outputs must equal transformers' greedy `generate()`, and every scenario - aborts, deadlines,
failed sends and passes - must end with both replicas empty."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pdserve.errors import StatusCode
from pdserve.messages import ReserveRequest, SamplingParams
from tests.factories.prefill_pair import (
    NUM_NEW_TOKENS,
    PROMPTS,
    WAIT_S,
    Pair,
    collect,
    greedy,
    output_tokens,
    prefill_request,
    serve,
    until,
)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["6-tokens", "1-token", "21-tokens"])
async def test_disaggregated_greedy_matches_generate(
    pair: Pair, prompt: list[int], reference: Callable[[list[int], int], list[int]]
) -> None:
    prefill_events, decode_events = await serve(pair, prompt, greedy())
    assert [e.kind for e in prefill_events] == ["first_token", "transferred"]
    first, transferred = prefill_events
    assert not first.finished and first.error is None
    assert transferred.transport == "inproc"
    assert transferred.transfer_s >= 0.0 and first.prefill_s > 0.0
    assert transferred.num_bytes == pair.layout.kv_bytes(len(prompt))
    assert all(e.error is None for e in decode_events)
    assert decode_events[-1].finish_reason == "length"
    assert all(not e.finish_reason for e in decode_events[:-1])
    assert output_tokens(prefill_events, decode_events) == reference(prompt, NUM_NEW_TOKENS)
    pair.assert_quiet()
    assert pair.prefill.load("n", 1).total_kv_bytes == pair.layout.kv_bytes(len(prompt))
    decode_load = pair.decode.load("n", 2)
    assert decode_load.total_kv_bytes == pair.layout.kv_bytes(len(prompt))
    assert decode_load.total_decode_tokens == NUM_NEW_TOKENS - 1


async def test_concurrent_requests_each_match_generate(
    pair: Pair, reference: Callable[[list[int], int], list[int]]
) -> None:
    results = await asyncio.gather(*(serve(pair, prompt, greedy()) for prompt in PROMPTS))
    for prompt, (prefill_events, decode_events) in zip(PROMPTS, results):
        assert output_tokens(prefill_events, decode_events) == reference(prompt, NUM_NEW_TOKENS)
    pair.assert_quiet()
    assert pair.decode.load("n", 2).total_requests == len(PROMPTS)


async def test_seeded_sampling_is_reproducible_across_requests(pair: Pair) -> None:
    sampling = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=1.5, seed=7, ignore_eos=True)
    runs = [output_tokens(*await serve(pair, PROMPTS[0], sampling)) for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == NUM_NEW_TOKENS
    pair.assert_quiet()


async def test_a_first_token_that_finishes_ends_the_stream(pair: Pair) -> None:
    transfer_id = "one-token"
    reply = pair.decode.reserve(ReserveRequest("r", transfer_id, len(PROMPTS[0]), 1))
    assert reply.ok
    events = await asyncio.wait_for(
        collect(pair.prefill.prefill(prefill_request(pair, transfer_id, PROMPTS[0], greedy(1)))),
        WAIT_S,
    )
    assert [(e.kind, e.finished) for e in events] == [("first_token", True)]
    assert pair.prefill.load("n", 1).total_kv_bytes == 0
    # The router aborts the unused reservation.
    assert pair.decode.abort(transfer_id)
    await pair.wait_quiet()


async def test_abort_while_queued_cancels_and_frees_everything(pair: Pair) -> None:
    blocks = pair.prefill_engine.block_manager
    # Hold every block so the job cannot leave the queue.
    blocks.allocate("hog", blocks.num_free_blocks * blocks.block_size)
    transfer_id = "queued"
    reply = pair.decode.reserve(ReserveRequest("r", transfer_id, len(PROMPTS[0]), 4))
    assert reply.ok
    task = asyncio.ensure_future(
        collect(pair.prefill.prefill(prefill_request(pair, transfer_id, PROMPTS[0], greedy(4))))
    )
    await until(lambda: pair.prefill.load("n", 1).num_waiting_requests == 1, "the job to queue")
    assert pair.prefill.abort(transfer_id)
    events = await asyncio.wait_for(task, WAIT_S)
    assert len(events) == 1 and events[0].kind == "error"
    assert events[0].error is not None and events[0].error.code is StatusCode.CANCELLED
    assert not pair.prefill.abort(transfer_id), "the job is gone"
    assert pair.decode.abort(transfer_id)
    blocks.free("hog")
    pair.assert_quiet()
    # The queue is not stuck: the next request runs.
    prefill_events, _ = await serve(pair, PROMPTS[1], greedy(3))
    assert prefill_events[-1].kind == "transferred"
    pair.assert_quiet()


async def test_deadline_while_queued_fails_and_frees(pair: Pair) -> None:
    blocks = pair.prefill_engine.block_manager
    blocks.allocate("hog", blocks.num_free_blocks * blocks.block_size)
    request = prefill_request(pair, "late", PROMPTS[0], greedy(4), deadline_s=0.3)
    events = await asyncio.wait_for(collect(pair.prefill.prefill(request)), WAIT_S)
    assert [e.kind for e in events] == ["error"]
    assert events[0].error is not None
    assert events[0].error.code is StatusCode.DEADLINE_EXCEEDED
    blocks.free("hog")
    pair.assert_quiet()


async def test_a_send_to_an_unexpecting_receiver_fails_and_frees(pair: Pair) -> None:
    # No reservation on the decode side: the receiver refuses the transfer id.
    request = prefill_request(pair, "nobody-expects-me", PROMPTS[0], greedy(4))
    events = await asyncio.wait_for(collect(pair.prefill.prefill(request)), WAIT_S)
    assert [e.kind for e in events] == ["first_token", "error"]
    assert events[1].error is not None and events[1].error.code is StatusCode.NOT_FOUND
    pair.assert_quiet()


async def test_a_failed_transfer_fails_both_sides_and_frees_both(pair: Pair) -> None:
    # The decode side reserved a different prompt length: the handshake of the push fails.
    prompt = PROMPTS[0]
    prefill_events, decode_events = await serve(
        pair, prompt, greedy(4), num_prompt_tokens=len(prompt) + 1
    )
    assert [e.kind for e in prefill_events] == ["first_token", "error"]
    assert prefill_events[1].error is not None
    assert prefill_events[1].error.code is StatusCode.FAILED_PRECONDITION
    assert len(decode_events) == 1 and decode_events[0].error is not None
    assert decode_events[0].error.code is StatusCode.FAILED_PRECONDITION
    assert decode_events[0].token_ids == []
    pair.assert_quiet()


async def test_duplicate_transfer_id_is_refused_without_touching_the_first(pair: Pair) -> None:
    blocks = pair.prefill_engine.block_manager
    blocks.allocate("hog", blocks.num_free_blocks * blocks.block_size)
    first = asyncio.ensure_future(
        collect(pair.prefill.prefill(prefill_request(pair, "dup", PROMPTS[0], greedy(4))))
    )
    await until(lambda: pair.prefill.load("n", 1).num_waiting_requests == 1, "the job to queue")
    second = await collect(pair.prefill.prefill(prefill_request(pair, "dup", PROMPTS[1], greedy())))
    assert [e.kind for e in second] == ["error"]
    assert pair.prefill.load("n", 1).num_waiting_requests == 1
    assert pair.prefill.abort("dup")
    assert [e.kind for e in await asyncio.wait_for(first, WAIT_S)] == ["error"]
    blocks.free("hog")
    pair.assert_quiet()


async def test_a_failed_pass_fails_its_request_and_the_worker_keeps_serving(pair: Pair) -> None:
    # A token id outside the vocabulary makes the embedding lookup raise inside the pass.
    transfer_id = "bad-pass"
    assert pair.decode.reserve(ReserveRequest("r", transfer_id, 2, 4)).ok
    request = prefill_request(pair, transfer_id, [5, 10**6], greedy(4))
    events = await asyncio.wait_for(collect(pair.prefill.prefill(request)), WAIT_S)
    assert [e.kind for e in events] == ["error"]
    assert events[0].error is not None and events[0].error.code is StatusCode.INTERNAL
    assert pair.decode.abort(transfer_id)
    await pair.wait_quiet()
    prefill_events, decode_events = await serve(pair, PROMPTS[0], greedy(3))
    assert prefill_events[-1].kind == "transferred"
    assert decode_events[-1].finish_reason == "length"
    pair.assert_quiet()
