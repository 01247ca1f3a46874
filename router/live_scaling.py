"""The router's scaling parts, wired from the config: a `PoolScaler` per pool behind one
`ScaleController` (what `Admin.Scale` calls), the autoscale loop of the pools that enable it,
and the pool-size gauges.

Built by `router.server.Router.start()` once it knows the served model (a new replica must
serve the same one: its KV is handed over to and from the others). Pools are keyed by role, so
any pool kind the router runs is scaled the same way. A grow first runs the start-up placement
check (`pdserve.placement`) on the Ray nodes alive then, with the pool's configured resources
(a scale call changes only sizes). Event loop only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import ray

from pdserve.config import PdserveConfig
from pdserve.errors import FailedPrecondition, Unavailable
from pdserve.messages import ModelInfo
from pdserve.metrics import RouterMetrics
from pdserve.placement import NodeView, alive_nodes, unplaceable_message
from pdserve.scale_config import DecodeAutoscaleConfig, PrefillAutoscaleConfig
from router.autoscale_loop import AutoscaleLoop
from router.autoscaler import Autoscaler, decode_autoscaler, prefill_autoscaler
from router.pool_scaler import PlacementCheck, PoolScaler, ReplicaFactory
from router.ray_calls import call_message
from router.replica_pool import STATES, Replica, ReplicaPool
from router.scaling import PoolLimits, ScaleController, pool_limits

logger = logging.getLogger(__name__)

MODEL_INFO_TIMEOUT_S = 60.0


class LiveScaling:
    """`controller` is None when the router has no replica factory (it cannot start actors):
    then only the gauges run."""

    def __init__(
        self,
        config: PdserveConfig,
        pools: Mapping[str, ReplicaPool],
        factory: ReplicaFactory | None,
        model: ModelInfo,
        metrics: RouterMetrics,
        queue_depth: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """`queue_depth` (the router queue's `WaitQueue.depth`) feeds the autoscalers."""
        self._config = config
        self._pools = dict(pools)
        self._model = model
        self._metrics = metrics
        for pool in self._pools.values():
            pool.target_replicas = len(pool.replicas)
        self.limits: dict[str, PoolLimits] = {
            role: pool_limits(config, role) for role in self._pools
        }
        self.controller: ScaleController | None = None
        self._autoscale: AutoscaleLoop | None = None
        if factory is not None:
            self.controller = ScaleController(self._scalers(factory), self.limits)
            autoscalers = {
                role: _autoscaler_for(limits)
                for role, limits in self.limits.items() if limits.autoscale_enabled
            }
            self._autoscale = AutoscaleLoop(
                self.controller, self._pools, autoscalers, config.timeouts.load_poll_interval_s,
                queue_depth,
            )

    def start(self) -> None:
        for role, pool in self._pools.items():
            self._metrics.watch_pool(role, STATES, pool.count_by_state, _target_of(pool))
        if self._autoscale is not None:
            self._autoscale.start()

    async def stop(self) -> None:
        """Stops deciding and cancels starts and drains in progress (their actors stay in the
        pools, for the service to kill)."""
        if self._autoscale is not None:
            await self._autoscale.stop()
        if self.controller is not None:
            await self.controller.stop()

    def _scalers(self, factory: ReplicaFactory) -> dict[str, PoolScaler]:
        timeouts = self._config.timeouts
        check_placement = placement_check(self._config, live_nodes)
        return {
            role: PoolScaler(
                pool, factory, self._check_model,
                check_placement=check_placement,
                start_timeout_s=timeouts.replica_start_s,
                drain_timeout_s=timeouts.drain_grace_s,
                poll_interval_s=timeouts.load_poll_interval_s,
            )
            for role, pool in self._pools.items()
        }

    async def _check_model(self, replica: Replica) -> None:
        """Raises FailedPrecondition when a new replica serves another model or dtype."""
        info = await call_message(
            replica.handle.model_info, ModelInfo, timeout_s=MODEL_INFO_TIMEOUT_S,
            what=f"{replica.replica_id}.model_info",
        )
        reference = self._model
        if (info.kv_fingerprint, info.dtype) != (reference.kv_fingerprint, reference.dtype):
            raise FailedPrecondition(
                f"{replica.replica_id} serves a different model or dtype than the running "
                "replicas: their KV cannot be handed over"
            )


def placement_check(
    config: PdserveConfig, list_nodes: Callable[[], list[NodeView]]
) -> PlacementCheck:
    """The scale-up check: raises FailedPrecondition when `num_replicas` replicas of pool `role`,
    with the resources of its section of `config`, could never be placed on the nodes
    `list_nodes` returns at the time of the call (`live_nodes` in the router)."""

    def check(role: str, num_replicas: int) -> None:
        resources = getattr(config, role).resources
        message = unplaceable_message(role, resources, num_replicas, list_nodes())
        if message is not None:
            raise FailedPrecondition(message)

    return check


def live_nodes() -> list[NodeView]:
    """The alive Ray nodes (a blocking call to Ray's GCS). Raises Unavailable when Ray cannot
    list them."""
    try:
        nodes = ray.nodes()
    except Exception as exc:  # noqa: BLE001 - whatever Ray raised, the scale caller sees it
        raise Unavailable(f"cannot list the Ray nodes to check placement: {exc}") from None
    return alive_nodes(nodes)


def _target_of(pool: ReplicaPool) -> Callable[[], int]:
    return lambda: pool.target_replicas


def _autoscaler_for(limits: PoolLimits) -> Autoscaler:
    config = limits.autoscale
    if isinstance(config, PrefillAutoscaleConfig):
        return prefill_autoscaler(config)
    if isinstance(config, DecodeAutoscaleConfig):
        return decode_autoscaler(config)
    raise AssertionError(f"no autoscaler for {type(config).__name__}")
