"""`wait_within`, the bounded wait the router and the replicas use instead of
`asyncio.wait_for`: a cancel of the caller is never lost, even when what it waits for completes
in the same moment (Python 3.11's `wait_for` then returns the result and the cancel is gone:
a request cancelled as the router queue woke it went on to run); a timeout cancels what it
waited for; results and errors pass through."""

from __future__ import annotations

import asyncio
import sys

import pytest

from pdserve.futures import wait_within


async def _cancelled_as_it_completes(wait: object) -> asyncio.Task[bool]:
    """A task waiting (with `wait`) on an event that is set in the same loop step as the
    task is cancelled."""
    event = asyncio.Event()

    async def waiter() -> bool:
        return await wait(event.wait(), 10.0)  # type: ignore[operator]

    task = asyncio.create_task(waiter())
    for _ in range(3):  # let it reach its wait
        await asyncio.sleep(0)
    event.set()
    task.cancel()
    return task


async def test_a_cancel_as_the_awaited_completes_is_not_lost() -> None:
    task = await _cancelled_as_it_completes(wait_within)
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps the cancel since 3.12")
async def test_asyncio_wait_for_loses_that_cancel_here() -> None:
    """Why `wait_within` exists: the same race through `asyncio.wait_for`."""
    task = await _cancelled_as_it_completes(asyncio.wait_for)
    assert await task is True


async def test_a_timeout_cancels_what_it_waited_for() -> None:
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.Event().wait()

    inner = asyncio.ensure_future(slow())
    with pytest.raises(asyncio.TimeoutError):
        await wait_within(inner, 0.01)
    await asyncio.sleep(0)
    assert started.is_set() and inner.cancelled()


async def test_results_and_errors_pass_through() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise ValueError("boom")

    assert await wait_within(answer(), 1.0) == 42
    assert await wait_within(answer(), None) == 42
    with pytest.raises(ValueError, match="boom"):
        await wait_within(fail(), 1.0)
