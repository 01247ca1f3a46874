"""PrefillWorker and DecodeWorker together in one process: the real tiny model, the inproc KV
transport, no Ray and no gRPC. Outputs must equal transformers' greedy `generate()`, and every
scenario must end with both replicas empty (cached prefix blocks count as free). With prefix
caching, a repeated prefix is computed once: a spy on the runner records what each pass got."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from decode_worker.worker import DecodeWorker
from engine.model_runner import SequenceChunk
from engine.replica_engine import ReplicaEngine, build_replica_engine
from kvtransfer import KVLayout, KVReceiver, make_receiver
from pdserve.config import PdserveConfig
from pdserve.errors import StatusCode
from pdserve.messages import (
    DecodeEvent,
    DecodeRequest,
    KVTarget,
    PrefillEvent,
    PrefillRequest,
    ReserveRequest,
    SamplingParams,
)
from prefill_worker.worker import PrefillWorker
from tests.factories.config import make_config
from tests.factories.model import build_tiny_model_dir

PROMPTS = [[5, 17, 42, 99, 7, 3], [64], list(range(100, 121))]  # 21 tokens: several blocks
NUM_NEW_TOKENS = 8
PREFILL_BLOCK_SIZE = 8
WAIT_S = 10.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def generate(prompt: list[int], num_new_tokens: int) -> list[int]:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=num_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[0, len(prompt) :].tolist()

    return generate


@dataclass
class Pair:
    config: PdserveConfig
    prefill: PrefillWorker
    decode: DecodeWorker
    prefill_engine: ReplicaEngine
    decode_engine: ReplicaEngine
    receiver: KVReceiver
    layout: KVLayout

    def assert_quiet(self) -> None:
        """The leak oracle: no block, job, sequence or transfer is left on either side."""
        for engine in (self.prefill_engine, self.decode_engine):
            blocks = engine.block_manager
            assert blocks.num_free_blocks == blocks.num_total_blocks
            assert blocks.num_owners == 0
        prefill_load = self.prefill.load("node", 1)
        assert prefill_load.num_active_requests == 0
        assert prefill_load.num_waiting_requests == 0
        assert prefill_load.num_leases == 0
        assert prefill_load.num_transfers == 0
        decode_load = self.decode.load("node", 2)
        assert decode_load.num_active_requests == 0
        assert decode_load.num_waiting_requests == 0
        assert decode_load.num_transfers == 0
        assert self.receiver.num_pending == 0

    async def wait_quiet(self) -> None:
        """For endings after which a send thread may still be winding down (it holds the
        blocks until it has noticed the cancel): quiet within a bounded time."""
        await until(self.is_quiet, "both replicas to be quiet")
        self.assert_quiet()

    def is_quiet(self) -> bool:
        try:
            self.assert_quiet()
        except AssertionError:
            return False
        return True


@pytest.fixture(params=[True, False], ids=["pipelined", "after-pass"])
async def pair(model_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async for built in build_pair(model_dir, request.param, prefix_caching=True):
        yield built


@pytest.fixture(params=[True, False], ids=["pipelined", "after-pass"])
async def uncached_pair(model_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async for built in build_pair(model_dir, request.param, prefix_caching=False):
        yield built


async def build_pair(
    model_dir: Path, layer_pipelining: bool, prefix_caching: bool
) -> AsyncIterator[Pair]:
    # Different block sizes on the two sides: the KV is re-paged on the way.
    config = make_config(
        str(model_dir),
        prefill={
            "kv_cache": {"memory_mb": 1, "block_size": PREFILL_BLOCK_SIZE},
            "prefix_caching": prefix_caching,
        },
        decode={"kv_cache": {"memory_mb": 1, "block_size": 16}},
        kv_transfer={"layer_pipelining": layer_pipelining},
    )
    config = with_inproc_transport(config)
    prefill_engine = build_replica_engine(config.model, config.prefill.kv_cache, 1)
    decode_engine = build_replica_engine(config.model, config.decode.kv_cache, 1)
    layout = KVLayout(**decode_engine.kv_layout_fields())  # type: ignore[arg-type]
    receiver = make_receiver("inproc", layout, config.kv_transfer)
    receiver.start()
    pair = Pair(
        config=config,
        prefill=PrefillWorker(config, "prefill-0", prefill_engine),
        decode=DecodeWorker(config, "decode-0", decode_engine, receiver),
        prefill_engine=prefill_engine,
        decode_engine=decode_engine,
        receiver=receiver,
        layout=layout,
    )
    yield pair
    close_prefill_worker(pair.prefill)
    receiver.stop()


def with_inproc_transport(config: PdserveConfig) -> PdserveConfig:
    """The config with `kv_transfer.transport: inproc`. The schema only admits auto/grpc/shm
    and PrefillWorker sends only over the configured transport, so the in-process transport is
    reachable only by skipping validation (model_copy does not validate; reported)."""
    kv_transfer = config.kv_transfer.model_copy(update={"transport": "inproc"})
    return config.model_copy(update={"kv_transfer": kv_transfer})


def close_prefill_worker(worker: PrefillWorker) -> None:
    """PrefillWorker has no close() yet (reported): stop its batch loop, thread pools and
    senders so they do not outlive the test."""
    if worker._loop_task is not None:
        worker._loop_task.cancel()
    worker._hand_off.close()
    worker._forward_pool.shutdown(wait=False)


def greedy(num_new_tokens: int = NUM_NEW_TOKENS, **fields: Any) -> SamplingParams:
    return SamplingParams(max_tokens=num_new_tokens, ignore_eos=True, **fields)


def prefill_request(
    pair: Pair,
    transfer_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    deadline_s: float = 30.0,
    address: str | None = None,
) -> PrefillRequest:
    return PrefillRequest(
        request_id=f"r-{transfer_id}",
        transfer_id=transfer_id,
        prompt_token_ids=prompt,
        sampling=sampling,
        eos_token_ids=[0],
        kv_target=KVTarget("decode-0", address or pair.decode.kv_address, "inproc"),
        deadline=time.time() + deadline_s,
    )


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def serve(
    pair: Pair, prompt: list[int], sampling: SamplingParams, num_prompt_tokens: int | None = None
) -> tuple[list[PrefillEvent], list[DecodeEvent]]:
    """One request as the router runs it: reserve, then prefill and generate concurrently."""
    transfer_id = uuid.uuid4().hex
    reply = pair.decode.reserve(
        ReserveRequest(
            request_id=f"r-{transfer_id}",
            transfer_id=transfer_id,
            num_prompt_tokens=num_prompt_tokens or len(prompt),
            max_tokens=sampling.max_tokens,
        )
    )
    assert reply.ok, reply.error
    assert reply.kv_address == pair.receiver.address
    decode_request = DecodeRequest(
        request_id=f"r-{transfer_id}",
        transfer_id=transfer_id,
        sampling=sampling,
        eos_token_ids=[0],
        deadline=time.time() + 30,
    )
    prefill_events, decode_events = await asyncio.wait_for(
        asyncio.gather(
            collect(pair.prefill.prefill(prefill_request(pair, transfer_id, prompt, sampling))),
            collect(pair.decode.generate(decode_request)),
        ),
        WAIT_S,
    )
    return prefill_events, decode_events


def output_tokens(
    prefill_events: list[PrefillEvent], decode_events: list[DecodeEvent]
) -> list[int]:
    return [prefill_events[0].token_id] + [t for e in decode_events for t in e.token_ids]


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


SYSTEM_PROMPT = [(7 * i) % 250 + 3 for i in range(5 * PREFILL_BLOCK_SIZE + 3)]  # 5 full blocks
SUFFIXES = [[11, 12, 13], [40], [90, 91, 92, 93, 94, 95, 96, 97, 98, 99]]


def spy_on_passes(pair: Pair) -> list[list[tuple[int, int]]]:
    """Records (new tokens, cached tokens) of every sequence of every prefill pass."""
    runner = pair.prefill_engine.runner
    original = runner.forward
    passes: list[list[tuple[int, int]]] = []

    def forward(chunks: list[SequenceChunk], on_layer_written: Any = None) -> torch.Tensor:
        passes.append([(len(c.token_ids), c.num_cached_tokens) for c in chunks])
        return original(chunks, on_layer_written=on_layer_written)

    runner.forward = forward  # type: ignore[method-assign]
    return passes


def cached_tokens_of(prompt: list[int]) -> int:
    """Block-aligned, and the last prompt token is always computed."""
    return (len(prompt) - 1) // PREFILL_BLOCK_SIZE * PREFILL_BLOCK_SIZE


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
