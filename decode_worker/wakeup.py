"""How a step loop with nothing it can run sleeps without spinning."""

from __future__ import annotations

import asyncio
import contextlib

from pdserve.futures import wait_within


class Wakeup:
    """A flag the loop sleeps on. Whatever may let a stalled sequence go on (a sequence joins
    or leaves, blocks are freed outside the loop) calls `notify`. Event loop only."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float | None = None) -> None:
        """Sleeps until the next `notify` or `timeout_s`. Call it right after a plan found
        nothing to run, with no await in between: a notify before the plan is stale (the
        plan saw its change), one during this wait ends it."""
        self._event.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_within(self._event.wait(), timeout_s)
