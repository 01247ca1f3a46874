"""The autoscaling decision for one pool: pure logic, fed with the pool's load reports.

`Autoscaler.decide(snapshot, now)` returns a new target size or None. It does no I/O and reads
no clock: the router's autoscale loop (`router.autoscale_loop`) passes the time and applies a
decision through the same scale path as `pdserve scale`. Rules, in order:

1. A target outside [min_replicas, max_replicas] (say, set by hand) is brought back at once.
2. While a replica of the pool is still starting, nothing is decided: its capacity is not in
   the signal yet.
3. The signal (prefill: waiting prompts per ready replica; decode: fraction of KV blocks in
   use) above `scale_up_*` grows the pool to enough replicas to bring it back under (at least
   one more), once `cooldown_s` has passed since the pool's last action. Requests waiting in
   the router queue for this pool (`PoolSnapshot.num_queued`, attributed by
   `router.autoscale_loop.queued_for`) count in the signal: for prefill each is one more
   waiting prompt; for decode each wants as many blocks as a running request holds on
   average (at least one), on top of the blocks in use, since no replica had room for it.
4. The signal below `scale_down_*` shrinks the pool by one, once it has stayed low for
   `cooldown_s` and the cooldown has passed, and only if one replica fewer would not push the
   signal over `scale_up_*` (which would flap).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.messages import LoadReport
from pdserve.scale_config import AutoscaleConfig, DecodeAutoscaleConfig, PrefillAutoscaleConfig


@dataclass(frozen=True)
class PoolSnapshot:
    """What the autoscaler sees of one pool at one moment."""

    target_replicas: int
    num_starting: int
    # Last report of each ready replica (draining, dead and unresponsive ones are left out).
    ready_loads: tuple[LoadReport, ...]
    # Requests in the router queue waiting for room this pool would give.
    num_queued: int = 0


@dataclass(frozen=True)
class Decision:
    target_replicas: int
    # One line for the log: which signal crossed which threshold.
    reason: str


@dataclass(frozen=True)
class Signal:
    """One pool's pressure, in the unit of its thresholds."""

    value: float
    # The value if the ready replicas were one fewer (inf when there is only one).
    value_without_one: float
    # Fewest ready replicas that would bring the value down to the scale-up threshold.
    num_replicas_needed: int


class SignalMeter(ABC):
    """Turns the ready replicas' load reports into a `Signal` (pool-specific)."""

    name: str

    @abstractmethod
    def measure(
        self, loads: Sequence[LoadReport], scale_up_at: float, num_queued: int = 0
    ) -> Signal:
        """`loads` is not empty; `num_queued` requests wait in the router queue for this
        pool's room."""


class WaitingPerReplica(SignalMeter):
    """Prefill: prompts waiting for a forward pass (on the replicas or in the router queue),
    per ready replica."""

    name = "waiting prompts per replica"

    def measure(
        self, loads: Sequence[LoadReport], scale_up_at: float, num_queued: int = 0
    ) -> Signal:
        num_waiting = sum(load.num_waiting_requests for load in loads) + num_queued
        num_replicas = len(loads)
        return Signal(
            value=num_waiting / num_replicas,
            value_without_one=_per(num_waiting, num_replicas - 1),
            num_replicas_needed=math.ceil(num_waiting / scale_up_at),
        )


class KVUsage(SignalMeter):
    """Decode: the fraction of the ready replicas' KV blocks reserved or in use, plus what the
    requests queued for decode room would take (each: a running request's average, at least
    one block). Above 1 when the queue wants more than the pool has."""

    name = "KV usage"

    def measure(
        self, loads: Sequence[LoadReport], scale_up_at: float, num_queued: int = 0
    ) -> Signal:
        num_total = sum(load.num_total_blocks for load in loads)
        num_used = sum(load.num_total_blocks - load.num_free_blocks for load in loads)
        if num_total <= 0:
            return Signal(0.0, 0.0, 0)
        num_active = sum(load.num_active_requests for load in loads)
        blocks_per_request = max(1.0, num_used / num_active) if num_active else 1.0
        num_wanted = num_used + num_queued * blocks_per_request
        blocks_per_replica = num_total / len(loads)
        return Signal(
            value=num_wanted / num_total,
            value_without_one=_per(num_wanted, num_total - blocks_per_replica),
            num_replicas_needed=math.ceil(num_wanted / (blocks_per_replica * scale_up_at)),
        )


class Autoscaler:
    """Decides one pool's target size. Holds only its pacing state (when it last acted, since
    when the signal has been low); `decide` never blocks and raises nothing."""

    def __init__(
        self, config: AutoscaleConfig, meter: SignalMeter, scale_up_at: float,
        scale_down_at: float,
    ) -> None:
        self._config = config
        self._meter = meter
        self._scale_up_at = scale_up_at
        self._scale_down_at = scale_down_at
        self._last_action_at: float | None = None
        self._low_since: float | None = None

    def decide(self, snapshot: PoolSnapshot, now: float) -> Decision | None:
        """The new target, or None to leave the pool as it is. `now` is monotonic seconds."""
        config = self._config
        target = snapshot.target_replicas
        bounded = min(max(target, config.min_replicas), config.max_replicas)
        if bounded != target:
            return self._act(
                bounded, now,
                f"target {target} outside [{config.min_replicas}, {config.max_replicas}]",
            )
        if snapshot.num_starting or not snapshot.ready_loads:
            self._low_since = None
            return None
        signal = self._meter.measure(
            snapshot.ready_loads, self._scale_up_at, snapshot.num_queued
        )
        described = f"{self._meter.name} {signal.value:.2f}"
        if snapshot.num_queued:
            described += f" ({snapshot.num_queued} queued in the router)"
        if signal.value > self._scale_up_at:
            self._low_since = None
            if target >= config.max_replicas or self._cooling(now):
                return None
            grown = min(config.max_replicas, max(target + 1, signal.num_replicas_needed))
            return self._act(grown, now, f"{described} > {self._scale_up_at}")
        if signal.value >= self._scale_down_at or target <= config.min_replicas:
            self._low_since = None
            return None
        if self._low_since is None:
            self._low_since = now
        if now - self._low_since < config.cooldown_s or self._cooling(now):
            return None
        if signal.value_without_one > self._scale_up_at:
            return None
        return self._act(target - 1, now, f"{described} < {self._scale_down_at}")

    def _cooling(self, now: float) -> bool:
        last = self._last_action_at
        return last is not None and now - last < self._config.cooldown_s

    def _act(self, target: int, now: float, reason: str) -> Decision:
        self._last_action_at = now
        self._low_since = None
        return Decision(target, reason)


def prefill_autoscaler(config: PrefillAutoscaleConfig) -> Autoscaler:
    return Autoscaler(
        config, WaitingPerReplica(), config.scale_up_waiting, config.scale_down_waiting
    )


def decode_autoscaler(config: DecodeAutoscaleConfig) -> Autoscaler:
    return Autoscaler(
        config, KVUsage(), config.scale_up_kv_usage, config.scale_down_kv_usage
    )


def _per(amount: float, count: float) -> float:
    return amount / count if count > 0 else math.inf
