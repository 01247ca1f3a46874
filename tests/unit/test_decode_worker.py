"""DecodeWorker alone (the real tiny model; the inproc receiver or a scripted fake receiver):
reservations, claims, aborts, expiry and refusals, each ending with nothing held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from decode_worker.worker import DecodeWorker
from engine.replica_engine import ReplicaEngine, build_replica_engine
from kvtransfer import KVLayout, KVReceiver, KVSink, TransferResult, make_receiver
from pdserve.errors import ErrorInfo, StatusCode
from pdserve.messages import DecodeEvent, DecodeRequest, ReserveRequest, SamplingParams
from tests.factories.config import make_config
from tests.factories.model import build_tiny_model_dir
from tests.factories.waiting import until

WAIT_S = 10.0
BLOCK_SIZE = 16


class FakeReceiver(KVReceiver):
    """A receiver the test drives: `complete()` reports a transfer as the real ones do, by
    calling the `on_done` given to `expect`."""

    transport = "fake"

    def __init__(self) -> None:
        self.expected: dict[str, tuple[int, KVSink, Callable[[TransferResult], None]]] = {}
        self.cancelled: list[str] = []

    @property
    def address(self) -> str:
        return "fake://decode"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def expect(
        self,
        transfer_id: str,
        num_tokens: int,
        sink: KVSink,
        on_done: Callable[[TransferResult], None],
    ) -> None:
        if num_tokens < 1 or transfer_id in self.expected:
            raise ValueError(f"bad expectation {transfer_id} ({num_tokens} tokens)")
        self.expected[transfer_id] = (num_tokens, sink, on_done)

    def cancel(self, transfer_id: str) -> None:
        self.expected.pop(transfer_id, None)
        self.cancelled.append(transfer_id)

    @property
    def num_pending(self) -> int:
        return len(self.expected)

    @property
    def total_bytes_received(self) -> int:
        return 0

    def complete(self, transfer_id: str, first_token_id: int, error: ErrorInfo | None = None):
        _, _, on_done = self.expected.pop(transfer_id)
        on_done(TransferResult(transfer_id, error is None, first_token_id, 0, 0.0, error))


@dataclass
class Decode:
    worker: DecodeWorker
    engine: ReplicaEngine
    receiver: KVReceiver

    @property
    def num_free_blocks(self) -> int:
        return self.engine.block_manager.num_free_blocks

    def is_quiet(self) -> bool:
        blocks = self.engine.block_manager
        load = self.worker.load("node", 1)
        return (
            blocks.num_free_blocks == blocks.num_total_blocks
            and blocks.num_owners == 0
            and load.num_active_requests == 0
            and load.num_waiting_requests == 0
            and load.num_transfers == 0
            and self.receiver.num_pending == 0
        )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make_decode(model_dir: Path) -> Any:
    receivers: list[KVReceiver] = []

    def make(
        receiver: str = "inproc", timeout_s: float = 30.0, memory_mb: int = 1,
        reservation: str = "on_demand",
    ) -> Decode:
        kv_cache = {"memory_mb": memory_mb, "block_size": BLOCK_SIZE, "reservation": reservation}
        config = make_config(
            str(model_dir), decode={"kv_cache": kv_cache}, kv_transfer={"timeout_s": timeout_s}
        )
        engine = build_replica_engine(config.model, config.decode.kv_cache, 1)
        if receiver == "fake":
            kv_receiver: KVReceiver = FakeReceiver()
        else:
            layout = KVLayout(**engine.kv_layout_fields())  # type: ignore[arg-type]
            kv_receiver = make_receiver("inproc", layout, config.kv_transfer)
        kv_receiver.start()
        receivers.append(kv_receiver)
        return Decode(DecodeWorker(config, "decode-0", engine, kv_receiver), engine, kv_receiver)

    yield make
    for receiver in receivers:
        receiver.stop()


def reserve_request(transfer_id: str, num_prompt_tokens: int = 6, max_tokens: int = 10):
    return ReserveRequest(f"r-{transfer_id}", transfer_id, num_prompt_tokens, max_tokens)


def decode_request(transfer_id: str, max_tokens: int = 10, deadline_s: float = 30.0):
    return DecodeRequest(
        request_id=f"r-{transfer_id}",
        transfer_id=transfer_id,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        eos_token_ids=[0],
        deadline=time.time() + deadline_s,
    )


async def collect(stream: AsyncIterator[DecodeEvent]) -> list[DecodeEvent]:
    return await asyncio.wait_for(_collect(stream), WAIT_S)


async def _collect(stream: AsyncIterator[DecodeEvent]) -> list[DecodeEvent]:
    return [event async for event in stream]


def error_code(events: list[DecodeEvent]) -> StatusCode | None:
    last = events[-1]
    return last.error.code if last.error is not None else None


async def test_reserve_holds_blocks_and_arms_the_receiver(make_decode: Any) -> None:
    decode = make_decode()
    total = decode.num_free_blocks
    reply = decode.worker.reserve(reserve_request("t", num_prompt_tokens=20, max_tokens=13))
    assert reply.ok and reply.error is None
    assert reply.kv_address == decode.receiver.address != ""
    assert decode.num_free_blocks == total - 3  # 33 slots in blocks of 16
    assert decode.receiver.num_pending == 1
    load = decode.worker.load("node", 1)
    assert (load.num_active_requests, load.num_waiting_requests) == (1, 1)
    assert load.kv_address == decode.receiver.address
    assert decode.worker.abort("t")
    assert decode.is_quiet()


async def test_abort_after_reserve_frees_at_once(make_decode: Any) -> None:
    decode = make_decode()
    assert decode.worker.reserve(reserve_request("t")).ok
    assert not decode.is_quiet()
    assert decode.worker.abort("t")
    assert decode.is_quiet()
    assert not decode.worker.abort("t"), "a second abort finds nothing"
    events = await collect(decode.worker.generate(decode_request("t")))
    assert error_code(events) is StatusCode.NOT_FOUND


async def test_an_unclaimed_reservation_expires_after_the_kv_timeout(make_decode: Any) -> None:
    decode = make_decode(timeout_s=0.5)
    reserved_at = time.monotonic()
    assert decode.worker.reserve(reserve_request("t")).ok
    await until(decode.is_quiet, "the reservation to expire")
    assert time.monotonic() - reserved_at >= 0.45, "freed before the KV timeout"
    events = await collect(decode.worker.generate(decode_request("t")))
    assert error_code(events) is StatusCode.NOT_FOUND


async def test_reserve_beyond_capacity_is_refused_and_changes_nothing(make_decode: Any) -> None:
    decode = make_decode(memory_mb=1, reservation="full")
    capacity = decode.engine.block_manager.num_total_blocks * BLOCK_SIZE
    assert decode.worker.reserve(reserve_request("big", capacity - 200, 100)).ok
    free, pending = decode.num_free_blocks, decode.receiver.num_pending
    before = decode.worker.load("node", 1)
    reply = decode.worker.reserve(reserve_request("more", 150, 150))
    assert not reply.ok
    assert reply.error is not None and reply.error.code is StatusCode.RESOURCE_EXHAUSTED
    assert reply.kv_address == ""
    assert (decode.num_free_blocks, decode.receiver.num_pending) == (free, pending)
    assert decode.worker.load("node", 1) == before
    assert not decode.worker.abort("more")
    assert decode.worker.abort("big")
    assert decode.is_quiet()
    # More than the whole cache: never, not "not now".
    refused = decode.worker.reserve(reserve_request("huge", capacity, 1))
    assert refused.error is not None and refused.error.code is StatusCode.INVALID_ARGUMENT
    assert decode.is_quiet()


async def test_on_demand_reserves_the_prompt_plus_the_margin(make_decode: Any) -> None:
    decode = make_decode()  # reserve_new_tokens: 16, one block
    total = decode.num_free_blocks
    assert decode.worker.reserve(reserve_request("long", 20, max_tokens=500)).ok
    assert decode.num_free_blocks == total - 3  # 20 + 16 slots in blocks of 16
    assert decode.worker.reserve(reserve_request("short", 20, max_tokens=4)).ok
    assert decode.num_free_blocks == total - 3 - 2  # 20 + 4 slots: max_tokens caps the margin
    assert decode.worker.abort("long") and decode.worker.abort("short")
    assert decode.is_quiet()


@pytest.mark.parametrize(
    ("reservation", "slots_left", "max_tokens", "ok"),
    [
        ("on_demand", 16, 10_000, True),  # the prompt and its margin fit: it grows later
        ("on_demand", 15, 15, True),  # exactly the whole cache
        ("on_demand", 15, 16, False),
        ("on_demand", 0, 1, False),
        ("full", 20, 20, True),
        ("full", 20, 21, False),
    ],
)
async def test_a_reservation_beyond_the_whole_cache_is_invalid_argument(
    make_decode: Any, reservation: str, slots_left: int, max_tokens: int, ok: bool
) -> None:
    """The prompt leaves `slots_left` of the whole cache's slots."""
    decode = make_decode(reservation=reservation)
    num_blocks = decode.engine.block_manager.num_total_blocks
    prompt = num_blocks * BLOCK_SIZE - slots_left
    reply = decode.worker.reserve(reserve_request("t", prompt, max_tokens))
    assert reply.ok is ok
    if not ok:
        assert reply.error is not None and reply.error.code is StatusCode.INVALID_ARGUMENT
        assert f"{prompt} prompt tokens" in reply.error.message
        assert f"has {num_blocks} blocks" in reply.error.message
    decode.worker.abort("t")
    assert decode.is_quiet()


async def test_duplicate_reservation_is_refused_and_keeps_the_first(make_decode: Any) -> None:
    decode = make_decode()
    assert decode.worker.reserve(reserve_request("t", 6, 10)).ok
    free = decode.num_free_blocks
    reply = decode.worker.reserve(reserve_request("t", 40, 10))
    assert not reply.ok and reply.error is not None
    assert decode.num_free_blocks == free
    assert decode.receiver.num_pending == 1
    assert decode.worker.abort("t")
    assert decode.is_quiet()


@pytest.mark.parametrize(
    ("num_prompt_tokens", "max_tokens"),
    [(0, 4), (-3, 10), (20, -19)],
    ids=["empty-prompt", "negative-prompt", "negative-max-tokens"],
)
async def test_reserve_with_impossible_sizes_is_refused_and_holds_nothing(
    make_decode: Any, num_prompt_tokens: int, max_tokens: int
) -> None:
    decode = make_decode()
    total = decode.num_free_blocks
    try:
        reply = decode.worker.reserve(reserve_request("t", num_prompt_tokens, max_tokens))
    except Exception as exc:
        held = total - decode.num_free_blocks
        pytest.fail(f"reserve raised {exc!r} and left {held} block(s) and the sequence held")
    assert not reply.ok
    assert reply.error is not None and reply.error.code is StatusCode.INVALID_ARGUMENT
    assert decode.is_quiet()


async def test_generate_decodes_after_the_commit_and_frees(make_decode: Any) -> None:
    decode = make_decode(receiver="fake")
    assert decode.worker.reserve(reserve_request("t", 6, 5)).ok
    task = asyncio.ensure_future(collect(decode.worker.generate(decode_request("t", 5))))
    decode.receiver.complete("t", first_token_id=42)
    events = await task
    assert sum(len(e.token_ids) for e in events) == 4
    assert events[-1].finish_reason == "length"
    assert decode.is_quiet()
    assert decode.receiver.cancelled == ["t"]  # released: the receiver forgets the id
    load = decode.worker.load("node", 1)
    assert (load.total_decode_steps, load.total_decode_tokens) == (4, 4)


async def test_a_failed_transfer_fails_generate_and_frees(make_decode: Any) -> None:
    decode = make_decode(receiver="fake")
    assert decode.worker.reserve(reserve_request("t")).ok
    task = asyncio.ensure_future(collect(decode.worker.generate(decode_request("t"))))
    decode.receiver.complete("t", -1, ErrorInfo(StatusCode.DATA_LOSS, "chunk 2: bad checksum"))
    events = await task
    assert len(events) == 1 and events[0].token_ids == []
    assert error_code(events) is StatusCode.DATA_LOSS
    assert decode.is_quiet()


async def test_generate_gives_up_when_the_kv_never_arrives(make_decode: Any) -> None:
    decode = make_decode(receiver="fake", timeout_s=0.5)
    assert decode.worker.reserve(reserve_request("t")).ok
    events = await collect(decode.worker.generate(decode_request("t")))
    assert error_code(events) is StatusCode.DEADLINE_EXCEEDED
    assert decode.is_quiet()
    assert "t" in decode.receiver.cancelled


async def test_a_second_generate_for_one_reservation_is_refused(make_decode: Any) -> None:
    decode = make_decode(receiver="fake")
    assert decode.worker.reserve(reserve_request("t", 6, 4)).ok
    decode.receiver.complete("t", first_token_id=7)
    stream = decode.worker.generate(decode_request("t", 4))
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)  # claimed and running
    second = await collect(decode.worker.generate(decode_request("t", 4)))
    assert error_code(second) is StatusCode.NOT_FOUND
    rest = await collect(stream)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(e.token_ids) for e in rest) == 3
    assert decode.is_quiet()
    third = await collect(decode.worker.generate(decode_request("t", 4)))
    assert error_code(third) is StatusCode.NOT_FOUND


async def test_abort_while_running_cancels_and_frees_after_the_step(make_decode: Any) -> None:
    decode = make_decode(receiver="fake")
    assert decode.worker.reserve(reserve_request("t", 6, 200)).ok
    stream = decode.worker.generate(decode_request("t", 200))
    decode.receiver.complete("t", first_token_id=42)
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
    assert len(first.token_ids) == 1 and first.error is None
    assert decode.worker.abort("t")
    rest = await collect(stream)
    assert error_code(rest) is StatusCode.CANCELLED
    assert sum(len(e.token_ids) for e in rest) < 198
    await until(decode.is_quiet, "the blocks to be freed after the step")


@pytest.mark.parametrize(
    "commit_first", [True, False], ids=["commit-then-generate", "generate-then-commit"]
)
async def test_abort_that_races_the_commit_still_cancels(
    make_decode: Any, commit_first: bool
) -> None:
    """The abort comes after generate() claimed the reservation and right after the commit,
    before generate has seen the commit. Ordering is by the loop's FIFO ready queue, not by
    timing. The stream must end CANCELLED rather than decode to max_tokens."""
    decode = make_decode(receiver="fake")
    loop = asyncio.get_running_loop()
    assert decode.worker.reserve(reserve_request("t", 6, 100)).ok

    def commit_then_abort() -> None:
        decode.receiver.complete("t", first_token_id=42)  # queues the worker's commit handler
        loop.call_soon(decode.worker.abort, "t")

    if commit_first:
        decode.receiver.complete("t", first_token_id=42)
    # _collect, not collect: generate claims in this task's first step.
    task = asyncio.ensure_future(_collect(decode.worker.generate(decode_request("t", 100))))
    if commit_first:
        loop.call_soon(decode.worker.abort, "t")
    else:
        loop.call_soon(commit_then_abort)
    events = await asyncio.wait_for(task, WAIT_S)
    assert error_code(events) is StatusCode.CANCELLED, (
        f"abort was lost: {sum(len(e.token_ids) for e in events)} tokens, "
        f"finish_reason={events[-1].finish_reason!r}"
    )
    await until(decode.is_quiet, "the blocks to be freed")


async def test_dropping_the_stream_frees_the_sequence(make_decode: Any) -> None:
    decode = make_decode(receiver="fake")
    assert decode.worker.reserve(reserve_request("t", 6, 200)).ok
    decode.receiver.complete("t", first_token_id=42)
    stream = decode.worker.generate(decode_request("t", 200))
    first = await asyncio.wait_for(stream.__anext__(), WAIT_S)
    assert len(first.token_ids) == 1
    await stream.aclose()  # what the router's stream close does to the generator
    await until(decode.is_quiet, "the blocks to be freed after the step")
    steps = decode.worker.load("node", 1).total_decode_steps
    assert steps < 199, "decoding went on after the stream was dropped"
