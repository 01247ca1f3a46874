"""A `ColocatedAttempt` against scripted colocated replicas: when every replica refuses for want
of room it waits in the router queue and tries again on a signal; INVALID_ARGUMENT only when
every replica says the request can never fit; priority and admission time reach the replica; a
preempted stream raises `Preempted` after its tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.errors import InvalidArgument, ResourceExhausted
from pdserve.messages import ColocatedEvent, SamplingParams
from pdserve.metrics import RouterMetrics
from router.colocated_attempt import ColocatedAttempt
from router.preemption import Preempted
from router.replica_pool import ReplicaPool
from router.validation import ValidatedRequest
from router.wait_queue import COLOCATED_ROOM, WaitQueue
from tests.factories.config import make_config
from tests.unit.fake_replicas import FakeActor, make_pool, use_fake_streams

CONFIG = make_config("unused", mode="colocated", colocated={"replicas": 2})
ADMITTED_AT = 77.5
PROMPT = [5, 6, 7]
NO_ROOM = ColocatedEvent(error=ResourceExhausted("generate: no free blocks").to_info())
NEVER_FITS = ColocatedEvent(error=InvalidArgument("generate", "needs 40 blocks").to_info())


@pytest.fixture(autouse=True)
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_streams(monkeypatch)


def attempt(pool: ReplicaPool, queue: WaitQueue, deadline_in_s: float = 60.0) -> ColocatedAttempt:
    request = ValidatedRequest(PROMPT, SamplingParams(max_tokens=8), [], None, priority=-2)
    return ColocatedAttempt(
        CONFIG, pool, [0], request, [], "req-1", time.time() + deadline_in_s, RouterMetrics(),
        admitted_at=ADMITTED_AT, wait_queue=queue,
    )


async def replicas(*scripts: list[list[ColocatedEvent]]) -> tuple[ReplicaPool, list[FakeActor]]:
    actors = []
    for index, replica_scripts in enumerate(scripts):
        actor = FakeActor(f"colocated-{index}", "colocated")
        actor.generate.scripts = replica_scripts
        actors.append(actor)
    return await make_pool("colocated", actors), actors


async def test_every_replica_full_waits_then_places_on_a_signal() -> None:
    done = [ColocatedEvent(token_ids=[40]), ColocatedEvent(token_ids=[41], finish_reason="stop")]
    pool, actors = await replicas([[NO_ROOM]], [[NO_ROOM], done])
    queue = WaitQueue(max_queued=0, retry_interval_s=60.0)
    running = attempt(pool, queue)
    task = asyncio.create_task(_collect(running))
    for _ in range(1000):  # bounded: the attempt reaches the queue within a few loop turns
        if queue.num_queued:
            break
        await asyncio.sleep(0.005)
    assert queue.depth() == {COLOCATED_ROOM: 1}
    queue.notify()  # e.g. another attempt closed and released its blocks
    assert await asyncio.wait_for(task, timeout=5) == [40, 41]
    running.close()
    assert running.report.prefill_replica == running.report.decode_replica == "colocated-1"
    assert running.report.queued_s > 0 and queue.num_queued == 0
    placed = actors[1].generate.requests[-1]
    assert (placed.priority, placed.admitted_at) == (-2, ADMITTED_AT)
    assert actors[0].aborted == [] and actors[1].aborted == []


async def test_invalid_argument_only_when_every_replica_says_so() -> None:
    pool, _ = await replicas([[NEVER_FITS]], [[NEVER_FITS]])
    queue = WaitQueue(4, 60.0)
    running = attempt(pool, queue)
    with pytest.raises(InvalidArgument) as info:
        await _collect(running)
    running.close()
    assert info.value.field == "prompt" and queue.num_queued == 0


async def test_one_replica_that_can_never_fit_it_does_not_fail_the_request() -> None:
    pool, _ = await replicas(
        [[NEVER_FITS]], [[ColocatedEvent(token_ids=[40], finish_reason="stop")]]
    )
    running = attempt(pool, WaitQueue(4, 60.0))
    assert await _collect(running) == [40]
    running.close()


async def test_a_preempted_stream_raises_preempted_after_its_tokens() -> None:
    pool, actors = await replicas(
        [[ColocatedEvent(token_ids=[40]), ColocatedEvent(token_ids=[41]),
          ColocatedEvent(preempted=True)]]
    )
    running = attempt(pool, WaitQueue(4, 60.0))
    received: list[int] = []
    with pytest.raises(Preempted):
        async for event in running.tokens():
            received += event.token_ids
    running.close()
    assert received == [40, 41]
    assert actors[0].aborted == [running.transfer_id]


async def _collect(running: ColocatedAttempt) -> list[int]:
    return [token async for event in running.tokens() for token in event.token_ids]
