"""Failing an asyncio future whose waiter may already be gone, and a bounded wait that never
loses a cancel (torch-free, for every process)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


def fail_future(future: asyncio.Future[Any], error: BaseException) -> None:
    """Sets `error` on `future` and marks it retrieved, so that asyncio does not log "exception
    was never retrieved" when nobody awaits it any more (an aborted request, a stream the
    router already closed). A waiter that is still there gets the error all the same.

    Called on the future's event loop. Raises asyncio.InvalidStateError if `future` is done
    (callers check `done()` first)."""
    future.set_exception(error)
    future.exception()


async def wait_within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """Awaits `awaitable` for at most `timeout_s` seconds (None: no bound); raises
    asyncio.TimeoutError after that, with `awaitable` cancelled (in the background: this does
    not wait for it to unwind).

    Use it instead of `asyncio.wait_for`, which on Python 3.11 loses a cancel of its caller
    when the awaited thing completes at the same moment: the caller then goes on as if never
    cancelled (a request cancelled while it was woken in the router queue went on to run, and
    its stream was never closed). Here a cancel of the caller always raises."""
    task = asyncio.ensure_future(awaitable)
    try:
        timeout = None if timeout_s is None else max(0.0, timeout_s)
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
