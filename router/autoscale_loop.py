"""The router's autoscale loop: every poll interval, each autoscaled pool's `Autoscaler` looks at
the pool's last load reports and the router queue's depth, and may set a new target through
`ScaleController.scale` (the same path as `pdserve scale`, so scale-downs drain safely, and a
grow no live Ray node could host is refused: the pool keeps its size, a WARNING says why, and a
later decision may try again).

The router queue's waiters count for the pool that is short (`queued_for`): requests waiting
for decode blocks for decode; requests waiting for an in-flight slot for decode too while any
request waits for decode blocks (the slots are then held by requests stuck on decode room, and
each newcomer will need decode room as well), else for prefill (each is a prompt to prefill,
queued in front of the prefill replicas' own queues); requests waiting for room in a full
prefill replica queue for prefill. Colocated replicas do both halves: every
waiter counts for them (no colocated autoscaler exists yet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from pdserve.errors import FailedPrecondition, PdserveError
from router.autoscaler import Autoscaler, Decision, PoolSnapshot
from router.replica_pool import ReplicaPool
from router.scaling import ScaleController
from router.wait_queue import COLOCATED_ROOM, DECODE_BLOCKS, IN_FLIGHT_SLOT, PREFILL_ROOM

logger = logging.getLogger(__name__)


def snapshot_of(pool: ReplicaPool, num_queued: int = 0) -> PoolSnapshot:
    """What the autoscaler may see of `pool` now, with `num_queued` router queue waiters
    attributed to it."""
    replicas = pool.replicas
    return PoolSnapshot(
        target_replicas=pool.target_replicas,
        num_starting=sum(1 for r in replicas if not r.joined),
        ready_loads=tuple(r.load for r in replicas if r.is_ready and r.load is not None),
        num_queued=num_queued,
    )


def queued_for(role: str, depth: Mapping[str, int]) -> int:
    """How many of the router queue's waiters (`depth`: `WaitQueue.depth()`) pool `role`
    should grow for; see the module docstring."""
    num_slot = depth.get(IN_FLIGHT_SLOT, 0)
    num_decode = depth.get(DECODE_BLOCKS, 0)
    if role == "decode":
        return num_decode + (num_slot if num_decode else 0)
    if role == "prefill":
        return depth.get(PREFILL_ROOM, 0) + (0 if num_decode else num_slot)
    if role == "colocated":
        return num_slot + depth.get(COLOCATED_ROOM, 0)
    return 0


class AutoscaleLoop:
    """Runs the autoscalers of `pools` (role -> pool, only the autoscaled ones). Event loop
    only; owns its task (`start` / `stop`)."""

    def __init__(
        self,
        controller: ScaleController,
        pools: Mapping[str, ReplicaPool],
        autoscalers: Mapping[str, Autoscaler],
        interval_s: float,
        queue_depth: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """`queue_depth` is the router queue's `WaitQueue.depth` (None: no queue to count)."""
        self._queue_depth = queue_depth
        self._controller = controller
        self._pools = dict(pools)
        self._autoscalers = dict(autoscalers)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._autoscalers:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def step(self, now: float) -> dict[str, Decision]:
        """Decides for every autoscaled pool and applies the decisions; returns them."""
        applied: dict[str, Decision] = {}
        depth = self._queue_depth() if self._queue_depth is not None else {}
        for role, autoscaler in self._autoscalers.items():
            snapshot = snapshot_of(self._pools[role], queued_for(role, depth))
            decision = autoscaler.decide(snapshot, now)
            if decision is None:
                continue
            try:
                self._controller.scale(
                    {role: decision.target_replicas}, f"autoscaler: {decision.reason}"
                )
            except FailedPrecondition as exc:
                logger.warning(
                    "autoscaler: not scaling %s to %d replicas (%s): %s", role,
                    decision.target_replicas, decision.reason, exc.message,
                )
                continue
            except PdserveError as exc:
                logger.error("autoscaler: cannot scale %s: %s", role, exc.message)
                continue
            applied[role] = decision
        return applied

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)  # the decision period, not synchronisation
            self.step(time.monotonic())
