"""Bounded waits for tests that run an event loop: poll a condition until it holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Long enough for a loaded 2-core machine; a passing test never waits it out.
WAIT_S = 30.0
# How often the condition is checked; each check lets the loop run its other tasks.
POLL_S = 0.005


async def until(
    condition: Callable[[], object], what: str = "the condition", timeout_s: float = WAIT_S
) -> None:
    """Returns once `condition()` is true; raises AssertionError naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_S)  # polling interval of a bounded wait
