"""An `Attempt` whose prefill replicas' queues are full: it tries the next replica, and when
every queue is full it waits in the router queue (holding its decode reservation) and starts
prefill once a queue has room, instead of failing with RESOURCE_EXHAUSTED. A prompt no prefill
replica can ever hold is INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.errors import InvalidArgument, ResourceExhausted
from pdserve.messages import DecodeEvent, PrefillEvent, SamplingParams
from pdserve.metrics import RouterMetrics
from router.attempt import Attempt, TokenEvent
from router.replica_pool import ReplicaPool
from router.validation import ValidatedRequest
from router.wait_queue import PREFILL_ROOM, WaitQueue
from tests.factories.config import make_config
from tests.unit.fake_replicas import FakeActor, make_pool, use_fake_streams

FIRST = PrefillEvent(kind="first_token", token_id=40, queue_s=0.5, prefill_s=0.25)
TRANSFERRED = PrefillEvent(kind="transferred", transport="grpc", num_bytes=64, transfer_s=0.1)
QUEUE_FULL = [PrefillEvent("error", error=ResourceExhausted("prefill queue full").to_info())]
NEVER_FITS = [PrefillEvent("error", error=InvalidArgument("prompt", "9 > 8 tokens").to_info())]


@pytest.fixture(autouse=True)
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_streams(monkeypatch)


async def _pools(prefills: list[FakeActor]) -> tuple[ReplicaPool, ReplicaPool, FakeActor]:
    decode = FakeActor("decode-0", "decode")
    decode.generate.scripts = [[DecodeEvent(token_ids=[41], finish_reason="stop")]]
    return await make_pool("prefill", prefills), await make_pool("decode", [decode]), decode


def _attempt(pools: tuple[ReplicaPool, ReplicaPool], queue: WaitQueue) -> Attempt:
    request = ValidatedRequest([5, 6, 7], SamplingParams(max_tokens=4), [], None)
    return Attempt(
        make_config("unused"), pools, [0], request, [], "req-1", time.time() + 30,
        RouterMetrics(), admitted_at=1.0, wait_queue=queue,
    )


async def _tokens(attempt: Attempt) -> list[int]:
    events: list[TokenEvent] = [event async for event in attempt.tokens()]
    return [token for event in events for token in event.token_ids]


async def test_a_full_prefill_queue_sends_the_request_to_the_next_replica() -> None:
    full, free = FakeActor("prefill-0", "prefill"), FakeActor("prefill-1", "prefill")
    full.prefill.scripts = [QUEUE_FULL]
    free.prefill.scripts = [[FIRST, TRANSFERRED]]
    prefill_pool, decode_pool, _ = await _pools([full, free])
    running = _attempt((prefill_pool, decode_pool), WaitQueue(4, 60.0))
    assert await _tokens(running) == [40, 41]
    running.close()
    assert running.report.prefill_replica == "prefill-1"
    assert full.aborted == [] and running.report.queued_s == 0.0


async def test_every_prefill_queue_full_waits_in_the_router_queue() -> None:
    prefill = FakeActor("prefill-0", "prefill")
    prefill.prefill.scripts = [QUEUE_FULL, QUEUE_FULL, [FIRST, TRANSFERRED]]
    prefill_pool, decode_pool, decode = await _pools([prefill])
    queue = WaitQueue(max_queued=0, retry_interval_s=60.0)  # no retry without a signal
    running = _attempt((prefill_pool, decode_pool), queue)
    task = asyncio.create_task(_tokens(running))
    deadline = time.monotonic() + 5
    while queue.depth() != {PREFILL_ROOM: 1}:
        assert time.monotonic() < deadline, "never queued for prefill room"
        await asyncio.sleep(0.005)
    assert len(decode.reserve_requests) == 1  # the reservation is held meanwhile
    queue.notify()  # a prefill queue freed a place: the head retries (and finds it full)
    while len(prefill.prefill.requests) < 2:
        assert time.monotonic() < deadline, "did not retry on the signal"
        await asyncio.sleep(0.005)
    queue.notify()
    assert await asyncio.wait_for(task, timeout=5) == [40, 41]
    running.close()
    assert len(prefill.prefill.requests) == 3 and running.report.queued_s > 0
    assert queue.num_queued == 0 and decode.aborted == []


async def test_a_prompt_no_prefill_replica_can_hold_is_invalid_argument() -> None:
    prefills = [FakeActor(f"prefill-{i}", "prefill") for i in range(2)]
    for actor in prefills:
        actor.prefill.scripts = [NEVER_FITS]
    prefill_pool, decode_pool, decode = await _pools(prefills)
    running = _attempt((prefill_pool, decode_pool), WaitQueue(4, 60.0))
    with pytest.raises(InvalidArgument, match="can ever hold"):
        await _tokens(running)
    running.close()
    assert decode.aborted == [running.transfer_id]  # its reservation is given back
