"""An `Attempt` against scripted replicas: a reservation no decode replica has room for waits in
the router queue and is retried on a capacity signal; INVALID_ARGUMENT only when every replica
says so; priority and admission time reach the replicas; a preempted decode stream raises
`Preempted` after its tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from pdserve.messages import DecodeEvent, PrefillEvent, ReserveReply, SamplingParams
from pdserve.metrics import RouterMetrics
from router.attempt import Attempt, TokenEvent
from router.preemption import Preempted
from router.replica_pool import ReplicaPool
from router.validation import ValidatedRequest
from router.wait_queue import DECODE_BLOCKS, WaitQueue
from tests.factories.config import make_config
from tests.factories.waiting import until
from tests.unit.fake_replicas import FakeActor, make_pool, use_fake_streams

CONFIG = make_config("unused")
ADMITTED_AT = 1000.25
PROMPT = [5, 6, 7]
FIRST = PrefillEvent(kind="first_token", token_id=40, queue_s=0.5, prefill_s=0.25)
TRANSFERRED = PrefillEvent(kind="transferred", transport="grpc", num_bytes=64, transfer_s=0.1)


@pytest.fixture(autouse=True)
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_streams(monkeypatch)


def request(priority: int = 3) -> ValidatedRequest:
    return ValidatedRequest(PROMPT, SamplingParams(max_tokens=8), [], None, priority=priority)


async def pools(
    decode_actors: list[FakeActor], decode_events: list[DecodeEvent]
) -> tuple[ReplicaPool, ReplicaPool, FakeActor]:
    prefill = FakeActor("prefill-0", "prefill")
    prefill.prefill.scripts = [[FIRST, TRANSFERRED]]
    for actor in decode_actors:
        actor.generate.scripts = [decode_events]
    return (
        await make_pool("prefill", [prefill]), await make_pool("decode", decode_actors), prefill
    )


def attempt(
    prefill_pool: ReplicaPool, decode_pool: ReplicaPool, queue: WaitQueue,
    previous: list[int] | None = None, deadline_in_s: float = 60.0,
) -> Attempt:
    return Attempt(
        CONFIG, (prefill_pool, decode_pool), [0], request(), previous or [], "req-1",
        time.time() + deadline_in_s, RouterMetrics(), admitted_at=ADMITTED_AT, wait_queue=queue,
    )


async def collect(tokens: Attempt) -> list[TokenEvent]:
    return [event async for event in tokens.tokens()]


async def test_no_room_anywhere_waits_in_the_queue_until_a_poll_finds_room() -> None:
    actors = [FakeActor("decode-0", "decode", 2), FakeActor("decode-1", "decode", 1)]
    for actor in actors:
        actor.refuse_reservations(ResourceExhausted("reserve: no free blocks"))
    prefill_pool, decode_pool, _ = await pools(
        actors, [DecodeEvent(token_ids=[41]), DecodeEvent(token_ids=[42], finish_reason="stop")]
    )
    queue = WaitQueue(max_queued=0, retry_interval_s=60.0)  # full for newcomers; not for us
    decode_pool.on_more_room.append(queue.notify)
    running = attempt(prefill_pool, decode_pool, queue)
    task = asyncio.create_task(collect(running))
    await until(lambda: queue.depth() == {DECODE_BLOCKS: 1})
    actors[1].reserve_replies = [ReserveReply(ok=True, kv_address="kv")]
    actors[1].num_free_blocks = 50  # the next poll reports more room: the capacity signal
    await decode_pool.poll_once()
    events = await asyncio.wait_for(task, timeout=5)
    running.close()
    assert [token for event in events for token in event.token_ids] == [40, 41, 42]
    assert queue.num_queued == 0
    assert running.report.queued_s > 0 and running.report.decode_replica == "decode-1"
    reserved = actors[1].reserve_requests[-1]
    assert (reserved.priority, reserved.admitted_at) == (3, ADMITTED_AT)
    (decode_request,) = actors[1].generate.requests
    assert (decode_request.priority, decode_request.admitted_at) == (3, ADMITTED_AT)
    assert actors[0].aborted == [] and actors[1].aborted == []  # finished by itself


async def test_one_replica_that_can_never_fit_it_does_not_fail_the_request() -> None:
    never = FakeActor("decode-0", "decode", 90)
    never.refuse_reservations(InvalidArgument("reserve", "needs 40 blocks, the cache has 8"))
    roomy = FakeActor("decode-1", "decode", 5)
    prefill_pool, decode_pool, _ = await pools(
        [never, roomy], [DecodeEvent(token_ids=[41], finish_reason="stop")]
    )
    running = attempt(prefill_pool, decode_pool, WaitQueue(4, 60.0))
    events = await collect(running)
    running.close()
    assert events[-1].finish_reason == "stop"
    assert running.report.decode_replica == "decode-1"


async def test_invalid_argument_only_when_every_replica_says_so() -> None:
    actors = [FakeActor(f"decode-{i}", "decode") for i in range(2)]
    for actor in actors:
        actor.refuse_reservations(InvalidArgument("reserve", "needs 40 blocks, the cache has 8"))
    prefill_pool, decode_pool, prefill = await pools(actors, [])
    queue = WaitQueue(4, 60.0)
    running = attempt(prefill_pool, decode_pool, queue)
    with pytest.raises(InvalidArgument) as info:
        await collect(running)
    running.close()
    assert info.value.field == "prompt" and "can ever hold" in info.value.message
    assert queue.num_queued == 0 and prefill.prefill.requests == []


async def test_no_room_on_one_and_never_on_the_other_waits() -> None:
    never = FakeActor("decode-0", "decode", 90)
    never.refuse_reservations(InvalidArgument("reserve", "too long"))
    full = FakeActor("decode-1", "decode", 0)
    full.refuse_reservations(ResourceExhausted("reserve: no free blocks"))
    prefill_pool, decode_pool, _ = await pools([never, full], [])
    queue = WaitQueue(4, 60.0)
    running = attempt(prefill_pool, decode_pool, queue, deadline_in_s=0.3)
    with pytest.raises(DeadlineExceeded, match="decode blocks"):
        await collect(running)
    running.close()
    assert queue.num_queued == 0


async def test_cancel_while_queued_holds_nothing() -> None:
    full = FakeActor("decode-0", "decode", 0)
    full.refuse_reservations(ResourceExhausted("reserve: no free blocks"))
    prefill_pool, decode_pool, prefill = await pools([full], [])
    queue = WaitQueue(4, 60.0)
    running = attempt(prefill_pool, decode_pool, queue)
    task = asyncio.create_task(collect(running))
    await until(lambda: queue.num_queued == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    running.close()
    assert queue.num_queued == 0
    assert full.aborted == [] and prefill.aborted == [] and prefill.prefill.requests == []


async def test_a_preempted_decode_stream_raises_preempted_after_its_tokens() -> None:
    decode = FakeActor("decode-0", "decode")
    prefill_pool, decode_pool, prefill = await pools(
        [decode], [DecodeEvent(token_ids=[41, 42]), DecodeEvent(preempted=True)]
    )
    queue = WaitQueue(4, 60.0)
    woken: list[str] = []
    queue.notify = lambda: woken.append("signal")  # type: ignore[method-assign]
    running = attempt(prefill_pool, decode_pool, queue, previous=[30, 31])
    received: list[int] = []
    with pytest.raises(Preempted) as info:
        async for event in running.tokens():
            received += event.token_ids
    running.close()
    assert received == [40, 41, 42]
    assert info.value.replica_id == "decode-0"
    # The re-prefill asked for prompt + previous tokens, with the request's order.
    (prefill_request,) = prefill.prefill.requests
    assert prefill_request.prompt_token_ids == PROMPT + [30, 31]
    (reserved,) = decode.reserve_requests
    assert reserved.num_prompt_tokens == 5 and reserved.max_tokens == 6
    # Not finished by itself: the transfer is aborted on both sides; the queue is signalled.
    assert decode.aborted == [running.transfer_id] and prefill.aborted == [running.transfer_id]
    # Signalled when prefill left its queue, and when close() released the decode blocks.
    assert woken == ["signal", "signal"]
