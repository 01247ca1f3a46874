"""Moving one live pool to its target size: start and admit new replicas, drain and retire
removed ones.

Life of a scale-up replica: first the placement check (`PlacementCheck`) refuses a target
that no live Ray node could host, before anything changes, rather than leave an actor pending
in Ray forever; it runs only when a new actor is needed (never on a shrink, nor when growing
back takes back draining replicas). Then the factory creates the actor under a fresh id
(`prefill-3` after `prefill-0..2`, even if `prefill-1` is gone); it sits in the pool as STARTING
but not joined (never polled, never placed on) until its `load()` answers (the model is loaded)
and its model matches the router's; then it is polled once and joins routing as READY. A
replica that fails to start is killed and dropped (the pool stays below target until the next
scale call, which starts another).

Life of a scale-down replica: the least useful member is picked (one still starting, then dead,
then unresponsive, then the ready one with the fewest pending requests, newest first on ties).
A starting one is killed at once. Any other is marked draining: placement skips it, its requests
run to the end. It is killed once two consecutive fresh reports show it empty (no request,
lease, transfer or used KV block) and the router placed nothing on it since, or when
`drain_timeout_s` runs out (its remaining requests then take the reliability path: retry or
migrate). Growing the pool again first takes back draining replicas.

Event loop only. `set_target` never waits for a replica (the placement check makes one short
call for the node list): starts and drains run as tasks this object owns; `stop()` cancels them
(the actors stay in the pool for the owner to kill).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from pdserve.errors import PdserveError, Unavailable
from pdserve.messages import LoadReport
from router.ray_calls import call
from router.replica_pool import DEAD, READY, STARTING, UNRESPONSIVE, Replica, ReplicaPool

logger = logging.getLogger(__name__)

# Consecutive empty reports before a drained replica is killed: the second, requested after
# the first, also covers a placement whose call was still on its way to the replica.
NUM_QUIET_REPORTS = 2
# Which members a scale-down removes first.
_REMOVAL_RANK = {STARTING: 0, DEAD: 1, UNRESPONSIVE: 2, READY: 3}


class ReplicaFactory(Protocol):
    """Creates and kills replica actors (`pdserve.pools.RayReplicaFactory`; fakes in tests)."""

    def create(self, role: str, replica_id: str) -> Any:
        """Starts the actor; returns its handle without waiting for it to load."""

    def kill(self, handle: Any) -> None:
        """Kills the actor for good (no restart); idempotent."""


# Checks a loaded replica serves the router's model; raises a PdserveError if not.
ModelCheck = Callable[[Replica], Awaitable[None]]
# (role, num_replicas): raises FailedPrecondition naming the pool and what no live Ray node
# offers when that many replicas of the pool could never be placed (`pdserve.placement`).
PlacementCheck = Callable[[str, int], None]


class PoolScaler:
    def __init__(
        self,
        pool: ReplicaPool,
        factory: ReplicaFactory,
        check_model: ModelCheck,
        *,
        check_placement: PlacementCheck,
        start_timeout_s: float,
        drain_timeout_s: float,
        poll_interval_s: float,
    ) -> None:
        self.pool = pool
        self._factory = factory
        self._check_model = check_model
        self._check_placement = check_placement
        self._start_timeout_s = start_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._poll_interval_s = poll_interval_s
        self._next_index = 1 + max((_index(r.replica_id) for r in pool.replicas), default=-1)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        pool.target_replicas = len(pool.replicas)

    @property
    def role(self) -> str:
        return self.pool.role

    def check_target(self, num_replicas: int) -> None:
        """Raises FailedPrecondition when reaching `num_replicas` needs a new actor that no live
        Ray node could host. Changes nothing; checks placement only when an actor would start."""
        if num_replicas > len(self.pool.replicas):  # draining replicas are taken back first
            self._check_placement(self.role, num_replicas)

    def set_target(self, num_replicas: int) -> None:
        """Moves the pool toward `num_replicas` (validated by the caller) in the background.
        Raises FailedPrecondition from `check_target`, changing nothing; Unavailable when Ray
        refuses to create an actor (replicas created before stay)."""
        self.check_target(num_replicas)
        if num_replicas != self.pool.target_replicas:
            logger.info(
                "%s pool: target %d -> %d", self.role, self.pool.target_replicas, num_replicas
            )
        self.pool.target_replicas = num_replicas
        members = [r for r in self.pool.replicas if not r.draining]
        missing = num_replicas - len(members)
        if missing > 0:
            self._grow(missing)
        for replica in _removal_order(members)[: max(0, -missing)]:
            self._shrink(replica)

    async def stop(self) -> None:
        """Cancels starts and drains in progress; their actors stay in the pool."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _grow(self, count: int) -> None:
        draining = sorted(
            (r for r in self.pool.replicas if r.draining),
            key=lambda r: _index(r.replica_id), reverse=True,
        )
        for replica in draining[:count]:
            logger.info("%s %s: drain ended, serving again", self.role, replica.replica_id)
            self.pool.set_draining(replica, False)
        for _ in range(count - len(draining[:count])):
            replica_id = f"{self.role}-{self._next_index}"
            self._next_index += 1
            try:
                handle = self._factory.create(self.role, replica_id)
            except Exception as exc:  # noqa: BLE001 - whatever Ray refused, the caller sees it
                raise Unavailable(f"cannot start {replica_id}: {exc}") from None
            replica = self.pool.add(replica_id, handle, joined=False)
            self._spawn(replica_id, self._start(replica))

    def _shrink(self, replica: Replica) -> None:
        if not replica.joined:
            logger.info("%s %s: start cancelled by a scale-down", self.role, replica.replica_id)
            task = self._tasks.get(replica.replica_id)
            if task is not None:
                task.cancel()
            self._retire(replica)
            return
        self.pool.set_draining(replica, True)
        if replica.replica_id not in self._tasks:
            self._spawn(replica.replica_id, self._drain(replica))

    async def _start(self, replica: Replica) -> None:
        started = time.monotonic()
        try:
            await call(
                replica.handle.load, timeout_s=self._start_timeout_s,
                what=f"{replica.replica_id}.load",
            )
            await self._check_model(replica)
        except PdserveError as exc:
            logger.error(
                "%s %s failed to start: %s; removing it", self.role, replica.replica_id,
                exc.message,
            )
            self._retire(replica)
            return
        replica.joined = True
        await self.pool.poll(replica)
        logger.info(
            "%s %s joined (%s) after %.1f s", self.role, replica.replica_id, replica.state,
            time.monotonic() - started,
        )

    async def _drain(self, replica: Replica) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        num_quiet = 0
        while replica.draining and replica.state != DEAD and num_quiet < NUM_QUIET_REPORTS:
            if time.monotonic() > deadline:
                logger.warning(
                    "%s %s: still busy after %.0f s of draining; stopping it anyway",
                    self.role, replica.replica_id, self._drain_timeout_s,
                )
                break
            await asyncio.sleep(self._poll_interval_s)  # the poll period, not synchronisation
            await self.pool.poll(replica)
            load = replica.load
            idle = load is not None and is_idle(load) and not replica.num_placed_since_report
            num_quiet = num_quiet + 1 if idle else 0
        if replica.draining:
            self._retire(replica)

    def _retire(self, replica: Replica) -> None:
        self._factory.kill(replica.handle)
        # Attempts still holding this replica (a drain cut short) then skip their abort calls.
        replica.state = DEAD
        self.pool.remove(replica.replica_id)
        logger.info("%s %s: stopped and removed", self.role, replica.replica_id)

    def _spawn(self, replica_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks[replica_id] = task
        task.add_done_callback(lambda done: self._forget(replica_id, done))

    def _forget(self, replica_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(replica_id) is task:
            del self._tasks[replica_id]
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "%s %s: scaling task failed", self.role, replica_id, exc_info=task.exception()
            )


def is_idle(load: LoadReport) -> bool:
    """Nothing in flight on the replica: no request, lease or transfer, every KV block free."""
    return not (
        load.num_active_requests or load.num_waiting_requests or load.num_leases
        or load.num_transfers or load.num_free_blocks != load.num_total_blocks
    )


def _removal_order(members: list[Replica]) -> list[Replica]:
    def key(replica: Replica) -> tuple[int, int, int]:
        rank = 0 if not replica.joined else _REMOVAL_RANK.get(replica.state, 3)
        return (rank, replica.pending_requests(), -_index(replica.replica_id))

    return sorted(members, key=key)


def _index(replica_id: str) -> int:
    """The number at the end of `prefill-3`; -1 when there is none."""
    _, _, number = replica_id.rpartition("-")
    return int(number) if number.isdigit() else -1
