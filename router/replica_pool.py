"""The router's live view of one pool (prefill or decode): replicas, their load, their state.

Owns the replica table of one role. A poll loop asks every replica for its `LoadReport`
(bounded by a timeout): a replica that answers is READY, one that does not is UNRESPONSIVE,
one whose actor is gone is DEAD. Placement reads the last reports plus the router's own count of
requests it placed since (reports lag by up to one poll interval). Event loop only.

Polls run per replica: a replica whose poll is still waiting (stalled) is skipped by the next
rounds, so it never delays the polls of the others. A request that got no answer to a control
call marks the replica suspect (`mark_suspect`): UNRESPONSIVE at once, so placement skips it,
until a poll answers again.

A poll that finds a replica newly READY or with more free KV blocks than its last report
calls the pool's `on_more_room` callbacks: the router queue's capacity signal.

Live scaling (`router.pool_scaler`) adds replicas that have not joined yet (STARTING, not
polled, never placed on) and marks replicas it removes as draining: they answer polls but show
DRAINING instead of READY, so placement skips them while their requests finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.errors import Unavailable
from pdserve.messages import LoadReport
from router.ray_calls import call_message

logger = logging.getLogger(__name__)

STARTING, READY, UNRESPONSIVE, DEAD = "starting", "ready", "unresponsive", "dead"
DRAINING = "draining"
STATES = (STARTING, READY, DRAINING, UNRESPONSIVE, DEAD)


@dataclass
class Replica:
    replica_id: str
    handle: Any
    state: str = STARTING
    load: LoadReport | None = None
    # Requests the router placed here that the last report may not show yet.
    num_placed_since_report: int = 0
    # False while a scaled-up replica loads: not polled, not placed on.
    joined: bool = True
    # Set by a scale-down: no new placements; removed once its requests finished.
    draining: bool = False

    @property
    def is_ready(self) -> bool:
        return self.state == READY

    @property
    def node_id(self) -> str:
        return self.load.node_id if self.load else ""

    @property
    def epoch(self) -> str:
        return self.load.epoch if self.load else ""

    def pending_requests(self) -> int:
        reported = self.load.num_active_requests if self.load else 0
        return reported + self.num_placed_since_report


class ReplicaPool:
    def __init__(self, role: str, poll_interval_s: float, poll_timeout_s: float) -> None:
        self.role = role
        self._poll_interval_s = poll_interval_s
        self._poll_timeout_s = poll_timeout_s
        self._replicas: dict[str, Replica] = {}
        self._task: asyncio.Task[None] | None = None
        # The poll of each replica still waiting for its answer (by replica id).
        self._polls_in_flight: dict[str, asyncio.Task[None]] = {}
        self.on_change: list[Any] = []
        # Called (event loop, must not block) when a poll finds more room: see the docstring.
        self.on_more_room: list[Callable[[], None]] = []
        # Size the pool is moving to; `router.pool_scaler` owns it once the router started.
        self.target_replicas = 0

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    @property
    def num_ready(self) -> int:
        return sum(1 for r in self._replicas.values() if r.is_ready)

    def add(self, replica_id: str, handle: Any, joined: bool = True) -> Replica:
        replica = Replica(replica_id, handle, joined=joined)
        self._replicas[replica_id] = replica
        return replica

    def remove(self, replica_id: str) -> None:
        """Forgets a replica (its actor is gone or going); no-op if unknown."""
        if self._replicas.pop(replica_id, None) is not None:
            self._changed()

    def set_draining(self, replica: Replica, draining: bool) -> None:
        """Starts (or, when the pool grows back, ends) a replica's drain; placement sees it at
        once (a replica that answered its last poll goes READY <-> DRAINING)."""
        replica.draining = draining
        previous = replica.state
        if draining and previous == READY:
            replica.state = DRAINING
        elif not draining and previous == DRAINING:
            replica.state = READY
        if replica.state != previous:
            logger.info("%s %s: %s -> %s", self.role, replica.replica_id, previous, replica.state)
            self._changed()

    def mark_suspect(self, replica: Replica, why: str) -> None:
        """A request got no answer from `replica` in time: UNRESPONSIVE now (placement skips
        it) instead of after its next poll times out; the next poll it answers makes it READY
        (or DRAINING) again. A DEAD or STARTING replica stays as it is."""
        if replica.state not in (READY, DRAINING):
            return
        logger.warning(
            "%s %s: %s -> %s (%s)", self.role, replica.replica_id, replica.state, UNRESPONSIVE,
            why,
        )
        replica.state = UNRESPONSIVE
        self._changed()

    def count_by_state(self) -> dict[str, int]:
        """Replicas per state, every state present (for Info and metrics)."""
        counts = dict.fromkeys(STATES, 0)
        # A copy first: the metrics scrape thread calls this while the event loop edits.
        for replica in list(self._replicas.values()):
            counts[replica.state] += 1
        return counts

    def get(self, replica_id: str) -> Replica:
        return self._replicas[replica_id]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        tasks = [*self._polls_in_flight.values(), *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def by_least_loaded(self) -> list[Replica]:
        """Ready replicas, fewest pending requests first. Raises UNAVAILABLE if none."""
        ready = [r for r in self._replicas.values() if r.is_ready]
        if not ready:
            raise Unavailable(f"no live {self.role} replica")
        return sorted(ready, key=lambda r: r.pending_requests())

    def by_most_free_blocks(self) -> list[Replica]:
        """Ready replicas, most free KV blocks first. Raises UNAVAILABLE if none."""
        ready = [r for r in self._replicas.values() if r.is_ready]
        if not ready:
            raise Unavailable(f"no live {self.role} replica")
        return sorted(ready, key=lambda r: -(r.load.num_free_blocks if r.load else 0))

    async def poll_once(self) -> None:
        await asyncio.gather(
            *(self._poll(r) for r in list(self._replicas.values()) if r.joined)
        )

    async def poll_ready(self) -> None:
        """Polls the replicas that look READY or DRAINING now (after a request lost one: the
        next placement must not trust a dead one). Replicas already known to be unresponsive
        are left to the background polls, so a stalled one never delays the caller."""
        await asyncio.gather(
            *(self._poll(r) for r in list(self._replicas.values()) if r.state in (READY, DRAINING))
        )

    async def poll(self, replica: Replica) -> None:
        """Polls one replica now (a report requested after any earlier state change)."""
        await self._poll(replica)

    async def _poll_forever(self) -> None:
        while True:
            self._start_polls()
            await asyncio.sleep(self._poll_interval_s)  # the poll period, not synchronisation

    def _start_polls(self) -> None:
        """Starts a poll of every joined replica whose previous poll has ended."""
        for replica in list(self._replicas.values()):
            if replica.joined and replica.replica_id not in self._polls_in_flight:
                task = asyncio.get_running_loop().create_task(self._poll(replica))
                self._polls_in_flight[replica.replica_id] = task
                task.add_done_callback(functools.partial(self._poll_ended, replica.replica_id))

    def _poll_ended(self, replica_id: str, _: asyncio.Task[None]) -> None:
        self._polls_in_flight.pop(replica_id, None)

    async def _poll(self, replica: Replica) -> None:
        previous = replica.state
        previous_epoch = replica.epoch
        previous_free = replica.load.num_free_blocks if replica.load else 0
        try:
            replica.load = await call_message(
                replica.handle.load, LoadReport, timeout_s=self._poll_timeout_s,
                what=f"{replica.replica_id}.load",
            )
            if previous_epoch and replica.epoch != previous_epoch:
                logger.warning(
                    "%s %s restarted: epoch %s -> %s", self.role, replica.replica_id,
                    previous_epoch, replica.epoch,
                )
            replica.num_placed_since_report = 0
            replica.state = DRAINING if replica.draining else READY
        except Unavailable:
            replica.state = DEAD
        except Exception:  # noqa: BLE001 - a slow or failing replica is just not ready
            replica.state = UNRESPONSIVE
        if replica.state != previous:
            logger.info("%s %s: %s -> %s", self.role, replica.replica_id, previous, replica.state)
            self._changed()
        if replica.state == READY and replica.load is not None and (
            previous != READY or replica.load.num_free_blocks > previous_free
        ):
            for callback in self.on_more_room:
                callback()

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()
