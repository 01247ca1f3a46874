"""The router queue: order by priority then arrival, only the head retries, the fast path, a
full queue, deadlines and cancels while queued, capacity signals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from pdserve.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from router.wait_queue import DECODE_BLOCKS, IN_FLIGHT_SLOT, QueueOrder, WaitQueue

# Long enough that a test only sees a retry it caused with a signal.
NO_SAFETY_NET_S = 60.0


class Slots:
    """A counted resource: `take` is a try_take that records who tried, in order."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.tries: list[str] = []

    def taker(self, name: str) -> Callable[[], Awaitable[str]]:
        async def take() -> str:
            self.tries.append(name)
            if self.free <= 0:
                raise ResourceExhausted("no slot")
            self.free -= 1
            return name

        return take


def order(priority: int, admitted_at: float) -> QueueOrder:
    return QueueOrder(priority, admitted_at)


def later(seconds: float = 60.0) -> float:
    return time.time() + seconds


async def settle() -> None:
    """Lets every ready task run until it blocks again."""
    for _ in range(20):
        await asyncio.sleep(0)


def start(
    queue: WaitQueue, slots: Slots, name: str, priority: int, admitted_at: float,
    deadline: float | None = None,
) -> asyncio.Task[tuple[str, float]]:
    return asyncio.create_task(
        queue.take(
            slots.taker(name), order(priority, admitted_at), deadline or later(), IN_FLIGHT_SLOT
        )
    )


async def test_free_capacity_is_taken_at_once_without_queueing() -> None:
    queue, slots = WaitQueue(4, NO_SAFETY_NET_S), Slots(free=1)
    taken, queued_s = await queue.take(slots.taker("a"), order(0, 1.0), later(), IN_FLIGHT_SLOT)
    assert (taken, queued_s) == ("a", 0.0)
    assert queue.num_queued == 0


async def test_waiters_are_served_by_priority_then_arrival() -> None:
    queue, slots = WaitQueue(8, NO_SAFETY_NET_S), Slots()
    tasks = {
        name: start(queue, slots, name, priority, admitted_at)
        for name, priority, admitted_at in [
            ("late-0", 0, 3.0), ("early-0", 0, 1.0), ("urgent", -1, 5.0), ("low", 2, 0.5),
        ]
    }
    await settle()
    assert queue.num_queued == 4
    served = []
    for _ in range(4):
        slots.free += 1
        queue.notify()
        await settle()
        served += [name for name, task in tasks.items() if task.done() and name not in served]
    assert served == ["urgent", "early-0", "late-0", "low"]
    assert queue.num_queued == 0


async def test_only_the_head_retries_on_a_signal() -> None:
    queue, slots = WaitQueue(8, NO_SAFETY_NET_S), Slots()
    first = start(queue, slots, "first", 0, 1.0)
    second = start(queue, slots, "second", 0, 2.0)
    await settle()
    slots.tries.clear()
    for _ in range(3):
        queue.notify()
        await settle()
    assert slots.tries == ["first"] * 3
    slots.free = 1
    queue.notify()
    assert (await first)[0] == "first"
    await settle()
    # The head that left woke the next one, which found no capacity.
    assert slots.tries[-1] == "second" and not second.done()
    second.cancel()


async def test_a_later_request_of_the_same_priority_never_overtakes() -> None:
    queue, slots = WaitQueue(8, NO_SAFETY_NET_S), Slots()
    waiting = start(queue, slots, "waiting", 0, 1.0)
    await settle()
    slots.free = 1  # capacity appears, but no signal has reached the head yet
    newcomer = start(queue, slots, "newcomer", 0, 2.0)
    await settle()
    assert "newcomer" not in slots.tries, "someone of its priority waits: no fast path"
    assert queue.num_queued == 2
    queue.notify()
    assert (await waiting)[0] == "waiting"
    slots.free = 1
    queue.notify()
    assert (await newcomer)[0] == "newcomer"


async def test_a_better_priority_takes_the_fast_path_past_worse_waiters() -> None:
    queue, slots = WaitQueue(8, NO_SAFETY_NET_S), Slots()
    low = start(queue, slots, "low", 5, 1.0)
    await settle()
    slots.free = 1
    urgent = slots.taker("urgent")
    taken, queued_s = await queue.take(urgent, order(0, 2.0), later(), IN_FLIGHT_SLOT)
    assert (taken, queued_s) == ("urgent", 0.0)
    assert not low.done()
    low.cancel()


async def test_a_full_queue_refuses_at_once() -> None:
    queue, slots = WaitQueue(2, NO_SAFETY_NET_S), Slots()
    waiters = [start(queue, slots, f"w{i}", 0, float(i)) for i in range(2)]
    await settle()
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="queue full"):
        await queue.take(slots.taker("x"), order(0, 9.0), later(), IN_FLIGHT_SLOT)
    assert time.monotonic() - started < 1.0
    # A request that already holds a slot (an attempt) still queues.
    unbounded = asyncio.create_task(
        queue.take(
            slots.taker("attempt"), order(0, 0.5), later(), DECODE_BLOCKS, bounded=False
        )
    )
    await settle()
    assert queue.num_queued == 3
    assert queue.depth() == {IN_FLIGHT_SLOT: 2, DECODE_BLOCKS: 1}
    for task in [*waiters, unbounded]:
        task.cancel()
    await asyncio.gather(*waiters, unbounded, return_exceptions=True)
    assert queue.num_queued == 0


async def test_zero_length_queue_refuses_when_there_is_no_capacity() -> None:
    queue, slots = WaitQueue(0, NO_SAFETY_NET_S), Slots()
    with pytest.raises(ResourceExhausted):
        await queue.take(slots.taker("x"), order(0, 1.0), later(), IN_FLIGHT_SLOT)


async def test_deadline_while_queued_leaves_the_queue_empty() -> None:
    queue, slots = WaitQueue(4, NO_SAFETY_NET_S), Slots()
    task = start(queue, slots, "slow", 0, 1.0, deadline=later(0.2))
    with pytest.raises(DeadlineExceeded, match="router queue"):
        await task
    assert queue.num_queued == 0


async def test_cancel_while_queued_leaves_at_once_and_wakes_the_next() -> None:
    queue, slots = WaitQueue(4, NO_SAFETY_NET_S), Slots()
    head = start(queue, slots, "head", 0, 1.0)
    behind = start(queue, slots, "behind", 0, 2.0)
    await settle()
    slots.free = 1
    head.cancel()
    await asyncio.gather(head, return_exceptions=True)
    # The head's leaving is a signal for the next one, which finds the slot.
    assert (await behind)[0] == "behind"
    assert queue.num_queued == 0
    assert slots.free == 0


async def test_the_safety_net_retries_the_head_without_a_signal() -> None:
    queue, slots = WaitQueue(4, retry_interval_s=0.05), Slots()
    task = start(queue, slots, "head", 0, 1.0)
    await settle()
    slots.free = 1  # no notify()
    taken, queued_s = await asyncio.wait_for(task, timeout=5)
    assert taken == "head" and queued_s > 0


async def test_an_error_other_than_no_room_ends_the_wait() -> None:
    queue = WaitQueue(4, NO_SAFETY_NET_S)
    calls = 0

    async def take() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ResourceExhausted("no room")
        raise Unavailable("no live decode replica")

    task = asyncio.create_task(queue.take(take, order(0, 1.0), later(), DECODE_BLOCKS))
    await settle()
    queue.notify()
    with pytest.raises(Unavailable):
        await task
    assert queue.num_queued == 0


async def test_refuse_ends_the_waits_for_one_kind_only() -> None:
    queue, slots = WaitQueue(4, NO_SAFETY_NET_S), Slots()
    slot_waiter = start(queue, slots, "slot", 0, 2.0)
    decode_waiter = asyncio.create_task(
        queue.take(slots.taker("decode"), order(0, 1.0), later(), DECODE_BLOCKS)
    )
    await settle()
    queue.refuse(IN_FLIGHT_SLOT, Unavailable("shutting down"))
    with pytest.raises(Unavailable):
        await slot_waiter
    assert not decode_waiter.done() and queue.num_queued == 1
    decode_waiter.cancel()
    await asyncio.gather(decode_waiter, return_exceptions=True)
