"""A PrefillWorker and a DecodeWorker wired together in one process (the real tiny model, the
inproc KV transport, no Ray, no gRPC) and the helpers the tests of tests/unit/prefill_decode/
drive them with: one request as the router runs it, the leak oracle, a spy on prefill passes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decode_worker.worker import DecodeWorker
from engine.model_runner import SequenceChunk
from engine.replica_engine import ReplicaEngine, build_replica_engine
from kvtransfer import KVLayout, KVReceiver, make_receiver
from pdserve.config import PdserveConfig
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
from tests.factories.waiting import until

PROMPTS = [[5, 17, 42, 99, 7, 3], [64], list(range(100, 121))]  # 21 tokens: several blocks
NUM_NEW_TOKENS = 8
PREFILL_BLOCK_SIZE = 8
WAIT_S = 10.0


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


async def build_pair(
    model_dir: Path, layer_pipelining: bool, prefix_caching: bool, **prefill: Any
) -> AsyncIterator[Pair]:
    # Different block sizes on the two sides: the KV is re-paged on the way.
    config = make_config(
        str(model_dir),
        prefill={
            "kv_cache": {"memory_mb": 1, "block_size": PREFILL_BLOCK_SIZE},
            "prefix_caching": prefix_caching,
            **prefill,
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
    pair.prefill.close()
    receiver.stop()


def with_inproc_transport(config: PdserveConfig) -> PdserveConfig:
    """The config with `kv_transfer.transport: inproc`. The schema only admits auto/grpc/shm
    and PrefillWorker sends only over the configured transport, so the in-process transport is
    reachable only by skipping validation (model_copy does not validate; reported)."""
    kv_transfer = config.kv_transfer.model_copy(update={"transport": "inproc"})
    return config.model_copy(update={"kv_transfer": kv_transfer})


def greedy(num_new_tokens: int = NUM_NEW_TOKENS, **fields: Any) -> SamplingParams:
    return SamplingParams(max_tokens=num_new_tokens, ignore_eos=True, **fields)


def prefill_request(
    pair: Pair,
    transfer_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    deadline_s: float = 30.0,
    address: str | None = None,
    eos_token_ids: tuple[int, ...] = (0,),
) -> PrefillRequest:
    return PrefillRequest(
        request_id=f"r-{transfer_id}",
        transfer_id=transfer_id,
        prompt_token_ids=prompt,
        sampling=sampling,
        eos_token_ids=list(eos_token_ids),
        kv_target=KVTarget("decode-0", address or pair.decode.kv_address, "inproc"),
        deadline=time.time() + deadline_s,
    )


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


async def serve(
    pair: Pair,
    prompt: list[int],
    sampling: SamplingParams,
    num_prompt_tokens: int | None = None,
    eos_token_ids: tuple[int, ...] = (0,),
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
        eos_token_ids=list(eos_token_ids),
        deadline=time.time() + 30,
    )
    prefill = prefill_request(pair, transfer_id, prompt, sampling, eos_token_ids=eos_token_ids)
    prefill_events, decode_events = await asyncio.wait_for(
        asyncio.gather(
            collect(pair.prefill.prefill(prefill)),
            collect(pair.decode.generate(decode_request)),
        ),
        WAIT_S,
    )
    return prefill_events, decode_events


def output_tokens(
    prefill_events: list[PrefillEvent], decode_events: list[DecodeEvent]
) -> list[int]:
    return [prefill_events[0].token_id] + [t for e in decode_events for t in e.token_ids]


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
