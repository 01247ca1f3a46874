"""A decode replica that never answers its reservation (stalled, not dead) costs a request at
most its share of the time left: the attempt goes on to the next replica, marks the silent one
suspect at once (placements skip it until it answers a poll), and aborts its transfer there in
case the call lands later. The pool's polls of healthy replicas never wait for a stalled one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pdserve.errors import DeadlineExceeded
from pdserve.messages import DecodeEvent, PrefillEvent, SamplingParams
from pdserve.metrics import RouterMetrics
from router import decode_reservation
from router.attempt import Attempt, ReplicaLost
from router.replica_pool import READY, UNRESPONSIVE, ReplicaPool
from router.validation import ValidatedRequest
from router.wait_queue import WaitQueue
from tests.factories.config import make_config
from tests.unit.fake_replicas import FakeActor, make_pool, use_fake_streams

FIRST = PrefillEvent(kind="first_token", token_id=40, queue_s=0.0, prefill_s=0.1)
TRANSFERRED = PrefillEvent(kind="transferred", transport="grpc", num_bytes=64, transfer_s=0.1)
DONE = [DecodeEvent(token_ids=[41], finish_reason="stop")]


class _Silent:
    """An actor method that never answers (a SIGSTOPped replica); counts its calls."""

    def __init__(self) -> None:
        self.num_calls = 0

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        self.num_calls += 1
        return asyncio.get_running_loop().create_future()


@pytest.fixture(autouse=True)
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_streams(monkeypatch)


@pytest.fixture
def reserve_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeout of every control call the attempt makes."""
    seen: list[float] = []
    real = decode_reservation.call_message

    async def spy(*args: Any, timeout_s: float, what: str) -> Any:
        seen.append(timeout_s)
        return await real(*args, timeout_s=timeout_s, what=what)

    monkeypatch.setattr(decode_reservation, "call_message", spy)
    return seen


async def _pools(decode_actors: list[FakeActor]) -> tuple[ReplicaPool, ReplicaPool]:
    prefill = FakeActor("prefill-0", "prefill")
    prefill.prefill.scripts = [[FIRST, TRANSFERRED]]
    for actor in decode_actors:
        actor.generate.scripts = [DONE]
    return await make_pool("prefill", [prefill]), await make_pool("decode", decode_actors)


def _attempt(pools: tuple[ReplicaPool, ReplicaPool], control_call_s: float, deadline_in_s: float):
    config = make_config("unused", timeouts={"control_call_s": control_call_s})
    request = ValidatedRequest([5, 6, 7], SamplingParams(max_tokens=4), [], None)
    return Attempt(
        config, pools, [0], request, [], "req-1", time.time() + deadline_in_s, RouterMetrics(),
        admitted_at=1.0, wait_queue=WaitQueue(4, 60.0),
    )


async def _stalled_and_healthy() -> tuple[FakeActor, FakeActor, tuple[ReplicaPool, ReplicaPool]]:
    stalled = FakeActor("decode-0", "decode", num_free_blocks=90)  # most room: asked first
    healthy = FakeActor("decode-1", "decode", num_free_blocks=10)
    pools = await _pools([stalled, healthy])
    stalled.reserve = _Silent()  # type: ignore[assignment]
    return stalled, healthy, pools


async def test_a_silent_replica_is_skipped_for_the_next_and_marked_suspect(
    reserve_timeouts: list[float],
) -> None:
    stalled, healthy, pools = await _stalled_and_healthy()
    running = _attempt(pools, control_call_s=0.2, deadline_in_s=60.0)
    events = [event async for event in running.tokens()]
    running.close()
    assert [t for event in events for t in event.token_ids] == [40, 41]
    assert running.report.decode_replica == "decode-1"
    assert reserve_timeouts == [0.2, 0.2]  # the cap, well below each one's share of 60 s
    decode_pool = pools[1]
    assert decode_pool.get("decode-0").state == UNRESPONSIVE
    assert [r.replica_id for r in decode_pool.by_most_free_blocks()] == ["decode-1"]
    # The unanswered call may still land: its transfer id is aborted there.
    assert stalled.aborted == [running.transfer_id] and healthy.aborted == []


async def test_no_replica_gets_more_than_its_share_of_the_time_left(
    reserve_timeouts: list[float],
) -> None:
    _, _, pools = await _stalled_and_healthy()
    running = _attempt(pools, control_call_s=30.0, deadline_in_s=4.0)
    events = [event async for event in running.tokens()]
    running.close()
    assert events[-1].finish_reason == "stop"
    first, second = reserve_timeouts
    assert 1.5 < first <= 2.0  # half of the ~4 s left: two replicas may be tried
    assert second <= 4.0 - first


async def test_when_the_only_replica_is_silent_the_attempt_loses_it() -> None:
    stalled = FakeActor("decode-0", "decode")
    pools = await _pools([stalled])
    stalled.reserve = _Silent()  # type: ignore[assignment]
    running = _attempt(pools, control_call_s=0.1, deadline_in_s=60.0)
    with pytest.raises(ReplicaLost, match="did not answer reserve"):
        [event async for event in running.tokens()]
    running.close()
    assert pools[1].get("decode-0").state == UNRESPONSIVE


async def test_the_requests_own_deadline_is_not_blamed_on_the_replica() -> None:
    stalled = FakeActor("decode-0", "decode")
    pools = await _pools([stalled])
    stalled.reserve = _Silent()  # type: ignore[assignment]
    running = _attempt(pools, control_call_s=30.0, deadline_in_s=0.2)
    with pytest.raises(DeadlineExceeded):
        [event async for event in running.tokens()]
    running.close()
    assert pools[1].get("decode-0").state == READY


async def test_a_suspect_replica_is_ready_again_once_it_answers_a_poll() -> None:
    actor = FakeActor("decode-0", "decode")
    pool = await make_pool("decode", [actor])
    pool.mark_suspect(pool.get("decode-0"), "test")
    assert pool.get("decode-0").state == UNRESPONSIVE
    await pool.poll_ready()  # only READY ones: the suspect is left to the background polls
    assert pool.get("decode-0").state == UNRESPONSIVE
    await pool.poll_once()
    assert pool.get("decode-0").state == READY


async def test_a_stalled_replica_never_delays_the_polls_of_the_others() -> None:
    stalled, healthy = FakeActor("decode-0", "decode"), FakeActor("decode-1", "decode")
    pool = ReplicaPool("decode", poll_interval_s=0.01, poll_timeout_s=60.0)
    pool.add(stalled.replica_id, stalled)
    pool.add(healthy.replica_id, healthy)
    silent, num_healthy_polls = _Silent(), [0]
    stalled.load = silent  # type: ignore[assignment]
    real_load = healthy.load.remote

    def counting_load(*args: Any) -> asyncio.Future[Any]:
        num_healthy_polls[0] += 1
        return real_load(*args)

    healthy.load.remote = counting_load  # type: ignore[method-assign]
    pool.start()
    try:
        deadline = time.monotonic() + 10
        while num_healthy_polls[0] < 5:
            assert time.monotonic() < deadline, "the healthy replica was not polled again"
            await asyncio.sleep(0.01)
    finally:
        await pool.stop()
    assert silent.num_calls == 1  # its one poll is still waiting: no pile-up behind it
    assert pool.get("decode-1").state == READY
