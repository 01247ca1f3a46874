"""The one scale path of a running service, keyed by pool role ("prefill", "decode", ...).

`ScaleController.scale({"decode": 3})` is what `Admin.Scale` (`pdserve scale`) and the
autoscale loop both call: it checks every requested size against the pool's bounds, and every
pool that would start a replica against the live Ray nodes (`PoolScaler.check_target`), first
(nothing changes when one fails), then hands each new target to the pool's `PoolScaler`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from pdserve.config import DecodePoolConfig, PdserveConfig, PrefillPoolConfig
from pdserve.errors import InvalidArgument
from pdserve.scale_config import AutoscaleConfig
from router.pool_scaler import PoolScaler

logger = logging.getLogger(__name__)

SCALE_FIELD = "target_replicas"


@dataclass(frozen=True)
class PoolLimits:
    """Bounds of one pool's size: a scale call may set 1..max_replicas; the autoscaler (when
    `autoscale.enabled`) keeps it within [min_replicas, max_replicas]."""

    min_replicas: int
    max_replicas: int
    # None: the pool's config has no `autoscale` section.
    autoscale: AutoscaleConfig | None

    @property
    def autoscale_enabled(self) -> bool:
        return self.autoscale is not None and self.autoscale.enabled


def pool_limits(config: PdserveConfig, role: str) -> PoolLimits:
    """The bounds of the pool configured in section `role` of `config`. The cap is
    `autoscale.max_replicas`, or the configured `replicas` if larger (a pool may always be
    scaled back to its configured size); a pool without an autoscale section cannot grow
    beyond its configured size."""
    section = getattr(config, role)
    if isinstance(section, (PrefillPoolConfig, DecodePoolConfig)):
        autoscale: AutoscaleConfig = section.autoscale
        return PoolLimits(
            min_replicas=autoscale.min_replicas,
            max_replicas=max(autoscale.max_replicas, section.replicas),
            autoscale=autoscale,
        )
    return PoolLimits(min_replicas=1, max_replicas=section.replicas, autoscale=None)


class ScaleController:
    """Owns the pools' `PoolScaler`s. Event loop only; `scale` never blocks."""

    def __init__(self, scalers: Mapping[str, PoolScaler], limits: Mapping[str, PoolLimits]):
        self._scalers = dict(scalers)
        self._limits = dict(limits)

    @property
    def roles(self) -> list[str]:
        return sorted(self._scalers)

    def limits(self, role: str) -> PoolLimits:
        return self._limits[role]

    def targets(self) -> dict[str, int]:
        """Every pool's current target size."""
        return {role: scaler.pool.target_replicas for role, scaler in self._scalers.items()}

    def scale(self, targets: Mapping[str, int], why: str) -> dict[str, int]:
        """Sets new target sizes; returns every pool's target from before the call.

        Raises InvalidArgument naming `target_replicas["<role>"]` for an unknown pool or a
        size outside 1..max_replicas, and `target_replicas` when no pool is named;
        FailedPrecondition naming the pool when a grow needs a replica no live Ray node could
        host. Then no pool changes. `why` is logged ("Admin.Scale", "autoscaler: ...")."""
        if not targets:
            raise InvalidArgument(SCALE_FIELD, f"name at least one pool ({self._pool_names()})")
        for role, num_replicas in targets.items():
            self._check(role, num_replicas)
        for role, num_replicas in targets.items():
            self._scalers[role].check_target(num_replicas)
        previous = self.targets()
        for role, num_replicas in targets.items():
            if num_replicas != previous[role]:
                logger.info("scale %s: %d -> %d (%s)", role, previous[role], num_replicas, why)
            self._scalers[role].set_target(num_replicas)
        return previous

    async def stop(self) -> None:
        for scaler in self._scalers.values():
            await scaler.stop()

    def _check(self, role: str, num_replicas: int) -> None:
        # The role comes from the client: shown escaped and cut short.
        shown = role if len(role) <= 32 and role.isprintable() else repr(role[:32]) + "..."
        field = f'{SCALE_FIELD}["{shown}"]'
        if role not in self._scalers:
            raise InvalidArgument(field, f"unknown pool; pools: {self._pool_names()}")
        cap = self._limits[role].max_replicas
        if not 1 <= num_replicas <= cap:
            raise InvalidArgument(
                field, f"{num_replicas} replicas is out of range [1, {cap}] "
                f"(the cap is {role}.autoscale.max_replicas or {role}.replicas)",
            )

    def _pool_names(self) -> str:
        return ", ".join(self.roles)
