"""Failing an asyncio future whose waiter may already be gone (torch-free, for every process)."""

from __future__ import annotations

import asyncio
from typing import Any


def fail_future(future: asyncio.Future[Any], error: BaseException) -> None:
    """Sets `error` on `future` and marks it retrieved, so that asyncio does not log "exception
    was never retrieved" when nobody awaits it any more (an aborted request, a stream the
    router already closed). A waiter that is still there gets the error all the same.

    Called on the future's event loop. Raises asyncio.InvalidStateError if `future` is done
    (callers check `done()` first)."""
    future.set_exception(error)
    future.exception()
