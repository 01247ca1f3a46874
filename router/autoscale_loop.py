"""The router's autoscale loop: every poll interval, each autoscaled pool's `Autoscaler` looks at
the pool's last load reports and may set a new target through `ScaleController.scale` (the same
path as `pdserve scale`, so scale-downs drain safely, and a grow no live Ray node could host is
refused: the pool keeps its size, a WARNING says why, and a later decision may try again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from pdserve.errors import FailedPrecondition, PdserveError
from router.autoscaler import Autoscaler, Decision, PoolSnapshot
from router.replica_pool import ReplicaPool
from router.scaling import ScaleController

logger = logging.getLogger(__name__)


def snapshot_of(pool: ReplicaPool) -> PoolSnapshot:
    """What the autoscaler may see of `pool` now."""
    replicas = pool.replicas
    return PoolSnapshot(
        target_replicas=pool.target_replicas,
        num_starting=sum(1 for r in replicas if not r.joined),
        ready_loads=tuple(r.load for r in replicas if r.is_ready and r.load is not None),
    )


class AutoscaleLoop:
    """Runs the autoscalers of `pools` (role -> pool, only the autoscaled ones). Event loop
    only; owns its task (`start` / `stop`)."""

    def __init__(
        self,
        controller: ScaleController,
        pools: Mapping[str, ReplicaPool],
        autoscalers: Mapping[str, Autoscaler],
        interval_s: float,
    ) -> None:
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
        for role, autoscaler in self._autoscalers.items():
            decision = autoscaler.decide(snapshot_of(self._pools[role]), now)
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
