"""The front door past `router.max_inflight_requests`: requests wait in the router queue (by
priority, then arrival) and proceed when a slot frees; RESOURCE_EXHAUSTED only when the queue is
full (HTTP 429); a deadline, a cancel or a drain while queued leave nothing behind."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from pdserve.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from pdserve.messages import SamplingParams
from router.choices import ChoiceChunk
from router.front_door import FrontDoor
from router.validation import ValidatedRequest
from router.wait_queue import router_queue
from tests.factories.config import make_config
from tests.factories.fake_flow import ScriptedFlow, router_tokenizer
from tests.factories.http_api import MODEL, start_api
from tests.factories.waiting import until

TOKENIZER = router_tokenizer()


def one_slot_door(max_queued: int = 4) -> tuple[FrontDoor, ScriptedFlow, asyncio.Event]:
    """A front door with one in-flight slot, over a flow whose runs hold after their first
    token until the returned event is set."""
    config = make_config(
        "unused",
        router={"max_inflight_requests": 1, "max_queued_requests": max_queued},
        timeouts={"load_poll_interval_s": 30.0},  # no safety-net retries: signals only
    )
    hold = asyncio.Event()
    flow = ScriptedFlow(TOKENIZER, hold_after_first=hold, wait_queue=router_queue(config))
    return FrontDoor(config, TOKENIZER, flow), flow, hold  # type: ignore[arg-type]


def request(priority: int = 0, num_choices: int = 1) -> ValidatedRequest:
    return ValidatedRequest(
        [5, 6, 7], SamplingParams(max_tokens=4), [], None, num_choices=num_choices,
        priority=priority,
    )


async def run(
    door: FrontDoor, validated: ValidatedRequest, deadline_in_s: float = 60.0, name: str = "r"
) -> list[ChoiceChunk]:
    chunks = door.generate(validated, time.time() + deadline_in_s, name)
    try:
        return [chunk async for chunk in chunks]
    finally:
        await chunks.aclose()


async def test_past_the_inflight_limit_a_request_waits_and_proceeds_when_a_slot_frees() -> None:
    door, flow, hold = one_slot_door()
    first = asyncio.create_task(run(door, request(), name="first"))
    await flow.first_token_sent.wait()
    second = asyncio.create_task(run(door, request(), name="second"))
    await until(lambda: door.num_queued == 1)
    assert len(flow.runs) == 1 and door.num_inflight == 1
    hold.set()
    await asyncio.gather(first, second)
    assert [run.request_id for run in flow.runs] == ["first", "second"]
    assert all(run.outcome == "finished" for run in flow.runs)
    first_admission, second_admission = (run.admission for run in flow.runs)
    assert first_admission is not None and second_admission is not None
    assert first_admission.queued_s == 0.0 and second_admission.queued_s > 0.0
    assert second_admission.admitted_at > first_admission.admitted_at
    assert door.num_inflight == 0 and door.num_queued == 0


async def test_queued_requests_start_by_priority_then_arrival() -> None:
    door, flow, hold = one_slot_door()
    holder = asyncio.create_task(run(door, request(), name="holder"))
    await flow.first_token_sent.wait()
    waiting = []
    for name, priority in [("normal-a", 0), ("normal-b", 0), ("low", 3), ("urgent", -1)]:
        waiting.append(asyncio.create_task(run(door, request(priority), name=name)))
        num_waiting = len(waiting)
        await until(lambda: door.num_queued == num_waiting)  # noqa: B023 - awaited here
    hold.set()
    await asyncio.gather(holder, *waiting)
    order = [run.request_id for run in flow.runs]
    assert order == ["holder", "urgent", "normal-a", "normal-b", "low"]


async def test_a_full_queue_is_resource_exhausted_at_once() -> None:
    door, flow, hold = one_slot_door(max_queued=1)
    holder = asyncio.create_task(run(door, request(), name="holder"))
    await flow.first_token_sent.wait()
    queued = asyncio.create_task(run(door, request(), name="queued"))
    await until(lambda: door.num_queued == 1)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="queue full"):
        await run(door, request(), name="refused")
    assert time.monotonic() - started < 1.0
    hold.set()
    await asyncio.gather(holder, queued)
    assert [run.request_id for run in flow.runs] == ["holder", "queued"]


async def test_more_choices_than_slots_are_refused_at_once() -> None:
    door, _, _ = one_slot_door()
    with pytest.raises(ResourceExhausted, match="max_inflight_requests"):
        await run(door, request(num_choices=2))
    assert door.num_queued == 0


async def test_deadline_while_queued_is_deadline_exceeded_and_leaves_nothing() -> None:
    door, flow, hold = one_slot_door()
    holder = asyncio.create_task(run(door, request(), name="holder"))
    await flow.first_token_sent.wait()
    with pytest.raises(DeadlineExceeded, match="router queue"):
        await run(door, request(), deadline_in_s=0.2, name="late")
    assert door.num_queued == 0 and door.num_inflight == 1
    hold.set()
    await holder
    assert [run.request_id for run in flow.runs] == ["holder"]
    assert door.num_inflight == 0


async def test_cancel_while_queued_leaves_the_queue_and_holds_no_slot() -> None:
    door, flow, hold = one_slot_door()
    holder = asyncio.create_task(run(door, request(), name="holder"))
    await flow.first_token_sent.wait()
    cancelled = asyncio.create_task(run(door, request(), name="cancelled"))
    await until(lambda: door.num_queued == 1)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert door.num_queued == 0 and door.num_inflight == 1
    hold.set()
    await holder
    assert door.num_inflight == 0
    await run(door, request(), name="after")
    assert [run.request_id for run in flow.runs] == ["holder", "after"]


async def test_drain_refuses_queued_requests_and_waits_for_inflight_ones() -> None:
    door, flow, hold = one_slot_door()
    holder = asyncio.create_task(run(door, request(), name="holder"))
    await flow.first_token_sent.wait()
    queued = asyncio.create_task(run(door, request(), name="queued"))
    await until(lambda: door.num_queued == 1)
    drained = asyncio.create_task(door.drain(grace_s=10.0))
    with pytest.raises(Unavailable, match="shutting down"):
        await queued
    hold.set()
    assert await drained
    await holder
    assert [run.request_id for run in flow.runs] == ["holder"]


async def test_choices_share_one_admission() -> None:
    config = make_config("unused", limits={"max_n": 3})
    flow = ScriptedFlow(TOKENIZER, wait_queue=router_queue(config))
    door = FrontDoor(config, TOKENIZER, flow)  # type: ignore[arg-type]
    await run(door, request(priority=2, num_choices=3))
    admissions = {run.admission for run in flow.runs}
    assert len(flow.runs) == 3 and len(admissions) == 1
    assert {run.request.priority for run in flow.runs} == {2}


async def test_http_waits_for_a_slot_then_429_once_the_queue_is_full() -> None:
    config = make_config(
        "unused", model={"served_model_name": MODEL},
        router={"max_inflight_requests": 1, "max_queued_requests": 1},
    )
    hold = asyncio.Event()
    api = await start_api(config, hold_after_first=hold)
    client = api.client()
    try:
        holder = asyncio.create_task(
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
        )
        await api.flow.first_token_sent.wait()
        queued = asyncio.create_task(
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={
                "priority": 1
            })
        )
        await until(lambda: api.door.num_queued == 1)
        with pytest.raises(openai.RateLimitError) as info:
            await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
        assert "queue" in info.value.message
        hold.set()
        replies = await asyncio.gather(holder, queued)
        assert all(reply.choices[0].text for reply in replies)
        assert [run.request.priority for run in api.flow.runs] == [0, 1]
        assert api.door.num_inflight == 0 and api.door.num_queued == 0
    finally:
        hold.set()
        await api.server.stop()
