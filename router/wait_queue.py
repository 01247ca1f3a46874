"""The router's one wait queue: requests that cannot take capacity now wait here, in order.

Two places take capacity: the front door (in-flight slots, `router.max_inflight_requests`) and
an attempt (decode blocks reserved on a decode replica, then a place in a prefill replica's
queue; in colocated mode, a colocated replica admitting the request). Each hands
`WaitQueue.take` a `try_take` coroutine function that returns what it took or raises
`ResourceExhausted` holding nothing.

- **Order.** Lower `priority` first, then earlier `admitted_at` (the front door's admission
  time, kept across re-prefills), then entry order. Only the head retries, so a later request
  never overtakes an earlier one of the same priority. A new caller skips the queue (tries at
  once) only when no waiter is ahead of it.
- **Wake-ups.** `notify()` is the capacity signal (a slot freed, an attempt released decode
  blocks, a poll saw more free blocks): it wakes the head. A head that got its capacity, gave
  up or was cancelled wakes the next one. A head with no signal retries every
  `retry_interval_s` anyway (a missed signal costs one interval, never a hang).
- **Bounds.** A request that holds nothing yet (front door, `bounded=True`) is refused with
  RESOURCE_EXHAUSTED at once when `max_queued` requests wait. A request that already holds an
  in-flight slot (an attempt) is never refused for a full queue: `max_inflight_requests`
  already bounds those, and refusing them could fail a stream mid-way. The deadline
  (DEADLINE_EXCEEDED) and cancellation end a wait at once; the waiter leaves and holds nothing.

Event loop only; `num_queued` and `depth` may also be read from the metrics scrape thread.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pdserve.config import PdserveConfig
from pdserve.errors import DeadlineExceeded, PdserveError, ResourceExhausted
from pdserve.futures import wait_within

T = TypeVar("T")

# What a waiter waits for (the `depth` keys; the autoscaler maps each onto a pool).
IN_FLIGHT_SLOT = "in-flight slot"
DECODE_BLOCKS = "decode blocks"
PREFILL_ROOM = "prefill room"
COLOCATED_ROOM = "colocated room"


@dataclass(frozen=True)
class QueueOrder:
    """Where a request stands: lower `priority` first, then earlier `admitted_at`."""

    priority: int
    # Wall clock of the request's admission by the front door.
    admitted_at: float


@dataclass(eq=False)
class _Waiter:
    key: tuple[int, float, int]
    waits_for: str
    # Set to make the waiter look again: a capacity signal or a change of head.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by `refuse`: the waiter raises it instead of retrying.
    refused: PdserveError | None = None


class WaitQueue:
    """The queue of requests waiting for capacity (see the module docstring)."""

    def __init__(self, max_queued: int, retry_interval_s: float) -> None:
        self._max_queued = max_queued
        self._retry_interval_s = retry_interval_s
        # Sorted by key; the head is first.
        self._waiters: list[_Waiter] = []
        self._entry_numbers = itertools.count()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    def depth(self) -> dict[str, int]:
        """Waiters by what they wait for (`IN_FLIGHT_SLOT`, `DECODE_BLOCKS`, ...)."""
        return dict(Counter(waiter.waits_for for waiter in list(self._waiters)))

    def notify(self) -> None:
        """A capacity signal: wakes the head to retry. Never blocks; a no-op when empty."""
        if self._waiters:
            self._waiters[0].wake.set()

    def refuse(self, waits_for: str, error: PdserveError) -> None:
        """Ends every wait for `waits_for` with `error` (wherever the waiter stands), e.g. the
        in-flight slot waits once the router drains."""
        for waiter in self._waiters:
            if waiter.waits_for == waits_for:
                waiter.refused = error
                waiter.wake.set()

    async def take(
        self,
        try_take: Callable[[], Awaitable[T]],
        order: QueueOrder,
        deadline: float,
        waits_for: str,
        *,
        bounded: bool = True,
    ) -> tuple[T, float]:
        """What `try_take()` returned, and the seconds spent waiting in the queue (0 when it
        succeeded at once). `deadline` is wall clock.

        Raises `ResourceExhausted` when the queue is full (`bounded` only) and whatever
        `try_take` raises other than `ResourceExhausted` (the waiter leaves first);
        `DeadlineExceeded` when the deadline passes while queued. Cancelling the caller
        removes its waiter at once."""
        if not self._anyone_ahead_of(order):
            try:
                return await try_take(), 0.0
            except ResourceExhausted:
                pass  # no capacity now: queue up
        if bounded and len(self._waiters) >= self._max_queued:
            raise ResourceExhausted(
                f"router queue full ({len(self._waiters)} requests waiting for capacity)"
            )
        waiter = self._enter(order, waits_for)
        entered_at = time.monotonic()
        try:
            taken = await self._wait_turns(waiter, try_take, deadline, entered_at)
        finally:
            self._leave(waiter)
        return taken, time.monotonic() - entered_at

    async def _wait_turns(
        self,
        waiter: _Waiter,
        try_take: Callable[[], Awaitable[T]],
        deadline: float,
        entered_at: float,
    ) -> T:
        """Retries `try_take` whenever `waiter` is the head and was woken (or the retry
        interval passed), until it succeeds, fails otherwise, or the deadline passes."""
        retry = False  # the caller just tried (or someone ahead is waiting)
        while True:
            if waiter.refused is not None:
                raise waiter.refused
            left = deadline - time.time()
            if left <= 0:
                raise DeadlineExceeded(
                    f"deadline exceeded after {time.monotonic() - entered_at:.1f} s in the "
                    f"router queue (waiting for {waiter.waits_for})"
                )
            if retry and self._is_head(waiter):
                waiter.wake.clear()  # a signal from now on means: try again
                try:
                    return await try_take()
                except ResourceExhausted:
                    pass
            elif waiter.wake.is_set():
                # A signal meant for the head reached this waiter as the head changed.
                waiter.wake.clear()
                self.notify()
            # A timeout is the safety net: the head retries without a signal.
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_within(
                    waiter.wake.wait(), min(left, self._retry_interval_s)
                )
            retry = True

    def _anyone_ahead_of(self, order: QueueOrder) -> bool:
        return bool(self._waiters) and self._waiters[0].key[:2] <= (
            order.priority, order.admitted_at
        )

    def _is_head(self, waiter: _Waiter) -> bool:
        return bool(self._waiters) and self._waiters[0] is waiter

    def _enter(self, order: QueueOrder, waits_for: str) -> _Waiter:
        key = (order.priority, order.admitted_at, next(self._entry_numbers))
        waiter = _Waiter(key, waits_for)
        bisect.insort(self._waiters, waiter, key=lambda w: w.key)
        return waiter

    def _leave(self, waiter: _Waiter) -> None:
        was_head = self._is_head(waiter)
        self._waiters.remove(waiter)
        if was_head:
            # The capacity that let it go (or that it no longer wants) may serve the next.
            self.notify()


def router_queue(config: PdserveConfig) -> WaitQueue:
    """The queue `config` describes: `router.max_queued_requests` long, the head retrying
    at least every `timeouts.load_poll_interval_s` (the pools' poll period)."""
    return WaitQueue(config.router.max_queued_requests, config.timeouts.load_poll_interval_s)
