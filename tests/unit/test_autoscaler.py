"""The autoscaling decisions (pure: load reports and a clock in, a target out) and the
`autoscale` config sections."""

from __future__ import annotations

import math

import pytest

from pdserve.config import parse_config
from pdserve.errors import ConfigError
from pdserve.messages import LoadReport
from pdserve.scale_config import DecodeAutoscaleConfig, PrefillAutoscaleConfig
from router.autoscale_loop import queued_for
from router.autoscaler import (
    KVUsage,
    PoolSnapshot,
    WaitingPerReplica,
    decode_autoscaler,
    prefill_autoscaler,
)
from router.wait_queue import COLOCATED_ROOM, DECODE_BLOCKS, IN_FLIGHT_SLOT

COOLDOWN_S = 10.0


def prefill_load(num_waiting: int) -> LoadReport:
    return LoadReport(
        replica_id="prefill-x", role="prefill", pid=1, node_id="n",
        num_active_requests=num_waiting, num_waiting_requests=num_waiting,
        num_free_blocks=100, num_total_blocks=100,
    )


def decode_load(num_used: int, num_total: int = 100, num_active: int = 0) -> LoadReport:
    return LoadReport(
        replica_id="decode-x", role="decode", pid=1, node_id="n", num_active_requests=num_active,
        num_waiting_requests=0, num_free_blocks=num_total - num_used, num_total_blocks=num_total,
    )


def snapshot(
    target: int, loads: list[LoadReport], num_starting: int = 0, num_queued: int = 0
) -> PoolSnapshot:
    return PoolSnapshot(target, num_starting, tuple(loads), num_queued)


def prefill_config(**overrides: object) -> PrefillAutoscaleConfig:
    values: dict[str, object] = dict(
        enabled=True, min_replicas=1, max_replicas=4, scale_up_waiting=4.0,
        scale_down_waiting=1.0, cooldown_s=COOLDOWN_S,
    )
    values.update(overrides)
    return PrefillAutoscaleConfig(**values)  # type: ignore[arg-type]


def decode_config(**overrides: object) -> DecodeAutoscaleConfig:
    values: dict[str, object] = dict(
        enabled=True, min_replicas=1, max_replicas=4, scale_up_kv_usage=0.8,
        scale_down_kv_usage=0.3, cooldown_s=COOLDOWN_S,
    )
    values.update(overrides)
    return DecodeAutoscaleConfig(**values)  # type: ignore[arg-type]


def test_prefill_grows_to_enough_replicas_for_the_queue() -> None:
    autoscaler = prefill_autoscaler(prefill_config())
    # 18 waiting on 1 replica: 18 / 4 per replica -> 5 replicas, capped at max 4.
    decision = autoscaler.decide(snapshot(1, [prefill_load(18)]), now=0.0)
    assert decision is not None and decision.target_replicas == 4
    assert "waiting prompts per replica 18.00 > 4.0" in decision.reason


def test_prefill_grows_by_at_least_one() -> None:
    autoscaler = prefill_autoscaler(prefill_config())
    # 9 waiting over 2 replicas = 4.5 > 4: ceil(9 / 4) = 3.
    decision = autoscaler.decide(snapshot(2, [prefill_load(5), prefill_load(4)]), now=0.0)
    assert decision is not None and decision.target_replicas == 3


def test_between_the_thresholds_nothing_happens() -> None:
    autoscaler = prefill_autoscaler(prefill_config())
    for now in (0.0, 100.0, 1000.0):
        assert autoscaler.decide(snapshot(2, [prefill_load(3), prefill_load(2)]), now) is None


def test_cooldown_separates_actions() -> None:
    autoscaler = prefill_autoscaler(prefill_config(max_replicas=8))
    assert autoscaler.decide(snapshot(1, [prefill_load(6)]), now=0.0) is not None
    busy = snapshot(2, [prefill_load(6), prefill_load(6)])
    assert autoscaler.decide(busy, now=COOLDOWN_S - 0.1) is None
    decision = autoscaler.decide(busy, now=COOLDOWN_S + 0.1)
    assert decision is not None and decision.target_replicas == 3


def test_nothing_is_decided_while_a_replica_starts() -> None:
    autoscaler = prefill_autoscaler(prefill_config(cooldown_s=0.0))
    assert autoscaler.decide(snapshot(2, [prefill_load(50)], num_starting=1), now=0.0) is None
    decision = autoscaler.decide(snapshot(2, [prefill_load(50), prefill_load(0)]), now=0.0)
    assert decision is not None and decision.target_replicas == 4


def test_never_above_max() -> None:
    autoscaler = prefill_autoscaler(prefill_config(max_replicas=2))
    assert autoscaler.decide(snapshot(2, [prefill_load(100), prefill_load(100)]), 0.0) is None


def test_scale_down_needs_the_low_signal_to_last_the_cooldown() -> None:
    autoscaler = prefill_autoscaler(prefill_config())
    idle = snapshot(3, [prefill_load(0)] * 3)
    assert autoscaler.decide(idle, now=0.0) is None
    assert autoscaler.decide(idle, now=COOLDOWN_S / 2) is None
    # A busy moment resets the low period.
    assert autoscaler.decide(snapshot(3, [prefill_load(2)] * 3), now=COOLDOWN_S / 2 + 1) is None
    low_again_at = COOLDOWN_S + 1
    assert autoscaler.decide(idle, now=low_again_at) is None
    assert autoscaler.decide(idle, now=low_again_at + COOLDOWN_S - 0.5) is None
    decision = autoscaler.decide(idle, now=low_again_at + COOLDOWN_S + 0.5)
    assert decision is not None and decision.target_replicas == 2
    assert "< 1.0" in decision.reason


def test_scale_down_is_one_at_a_time_and_never_below_min() -> None:
    autoscaler = prefill_autoscaler(prefill_config(min_replicas=2, cooldown_s=0.0))
    decision = autoscaler.decide(snapshot(4, [prefill_load(0)] * 4), now=0.0)
    assert decision is not None and decision.target_replicas == 3
    decision = autoscaler.decide(snapshot(3, [prefill_load(0)] * 3), now=1.0)
    assert decision is not None and decision.target_replicas == 2
    assert autoscaler.decide(snapshot(2, [prefill_load(0)] * 2), now=2.0) is None


def test_no_scale_down_that_would_cross_the_scale_up_threshold() -> None:
    # KV usage 0.5 < down 0.6, but on one replica fewer it would be 1.0 > up 0.9: would flap.
    autoscaler = decode_autoscaler(
        decode_config(scale_up_kv_usage=0.9, scale_down_kv_usage=0.6, cooldown_s=0.0)
    )
    assert autoscaler.decide(snapshot(2, [decode_load(50), decode_load(50)]), now=0.0) is None
    # With 3 replicas at usage 0.5 one fewer gives 0.75 < 0.9: allowed.
    decision = autoscaler.decide(snapshot(3, [decode_load(50)] * 3), now=1.0)
    assert decision is not None and decision.target_replicas == 2


def test_target_outside_bounds_is_brought_back_at_once() -> None:
    autoscaler = decode_autoscaler(decode_config(min_replicas=2, max_replicas=3))
    decision = autoscaler.decide(snapshot(1, [decode_load(0)]), now=0.0)
    assert decision is not None and decision.target_replicas == 2
    decision = autoscaler.decide(snapshot(5, [decode_load(0)] * 5), now=0.1)
    assert decision is not None and decision.target_replicas == 3


def test_decode_grows_on_kv_usage() -> None:
    autoscaler = decode_autoscaler(decode_config())
    # 170 of 200 blocks used (0.85 > 0.8): 170 / (100 * 0.8) -> 3 replicas.
    decision = autoscaler.decide(snapshot(2, [decode_load(90), decode_load(80)]), now=0.0)
    assert decision is not None and decision.target_replicas == 3
    assert "KV usage 0.85 > 0.8" in decision.reason


def test_no_ready_replica_means_no_decision() -> None:
    autoscaler = decode_autoscaler(decode_config(cooldown_s=0.0))
    assert autoscaler.decide(snapshot(2, []), now=0.0) is None


def test_signals() -> None:
    waiting = WaitingPerReplica().measure([prefill_load(3), prefill_load(5)], scale_up_at=2.0)
    assert (waiting.value, waiting.value_without_one, waiting.num_replicas_needed) == (4, 8, 4)
    alone = WaitingPerReplica().measure([prefill_load(3)], scale_up_at=2.0)
    assert alone.value_without_one == math.inf
    usage = KVUsage().measure([decode_load(30, 100), decode_load(10, 100)], scale_up_at=0.5)
    assert usage.value == pytest.approx(0.2)
    assert usage.value_without_one == pytest.approx(0.4)
    assert usage.num_replicas_needed == 1


def test_router_queue_waiters_are_waiting_prompts_for_prefill() -> None:
    autoscaler = prefill_autoscaler(prefill_config())
    # 2 waiting on the replica + 6 in the router queue = 8 > 4 per replica: 2 replicas.
    decision = autoscaler.decide(snapshot(1, [prefill_load(2)], num_queued=6), now=0.0)
    assert decision is not None and decision.target_replicas == 2
    assert "waiting prompts per replica 8.00 (6 queued in the router) > 4.0" in decision.reason


def test_router_queue_waiters_want_a_running_requests_blocks_on_decode() -> None:
    autoscaler = decode_autoscaler(decode_config())
    # 60 blocks over 6 running requests (10 each) + 3 queued -> 90 / 100 = 0.9 > 0.8.
    loads = [decode_load(60, num_active=6)]
    assert autoscaler.decide(snapshot(1, loads), now=0.0) is None
    decision = autoscaler.decide(snapshot(1, loads, num_queued=3), now=0.0)
    assert decision is not None and decision.target_replicas == 2
    assert "KV usage 0.90 (3 queued in the router)" in decision.reason


def test_queued_requests_block_a_decode_scale_down() -> None:
    autoscaler = decode_autoscaler(decode_config(cooldown_s=0.0))
    # 20 of 200 blocks used (0.1 < 0.3), but 20 queued requests want 5 blocks each (as the
    # 4 running ones hold): (20 + 100) / 200 = 0.6, between the thresholds.
    loads = [decode_load(10, num_active=2), decode_load(10, num_active=2)]
    assert autoscaler.decide(snapshot(2, loads, num_queued=20), now=0.0) is None
    assert autoscaler.decide(snapshot(2, loads, num_queued=20), now=100.0) is None
    decision = autoscaler.decide(snapshot(2, loads), now=200.0)
    assert decision is not None and decision.target_replicas == 1


def test_queue_waiters_count_for_the_pool_that_is_short() -> None:
    slots_only = {IN_FLIGHT_SLOT: 5}
    assert queued_for("prefill", slots_only) == 5 and queued_for("decode", slots_only) == 0
    decode_short = {IN_FLIGHT_SLOT: 5, DECODE_BLOCKS: 2}
    assert queued_for("decode", decode_short) == 7 and queued_for("prefill", decode_short) == 0
    assert queued_for("colocated", {IN_FLIGHT_SLOT: 1, COLOCATED_ROOM: 2}) == 3
    assert queued_for("prefill", {}) == 0


@pytest.mark.parametrize(
    ("section", "raw", "message"),
    [
        ("prefill", {"min_replicas": 3, "max_replicas": 2},
         "prefill.autoscale.min_replicas (3) must not exceed prefill.autoscale.max_replicas (2)"),
        ("prefill", {"scale_up_waiting": 1.0, "scale_down_waiting": 1.0},
         "prefill.autoscale.scale_down_waiting (1.0) must be below "
         "prefill.autoscale.scale_up_waiting (1.0)"),
        ("decode", {"scale_up_kv_usage": 0.5, "scale_down_kv_usage": 0.7},
         "decode.autoscale.scale_down_kv_usage (0.7) must be below "
         "decode.autoscale.scale_up_kv_usage (0.5)"),
        ("decode", {"min_replicas": 0}, "decode.autoscale.min_replicas"),
        ("decode", {"target": 1}, "decode.autoscale.target: unknown key; valid keys: cooldown_s"),
    ],
)  # fmt: skip
def test_bad_autoscale_config_names_the_key(section: str, raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({section: {"autoscale": raw}}, origin="test.yaml")
    assert message in str(caught.value)


def test_autoscale_is_off_by_default() -> None:
    config = parse_config({})
    assert not config.prefill.autoscale.enabled and not config.decode.autoscale.enabled
    assert config.decode.autoscale.scale_down_kv_usage < config.decode.autoscale.scale_up_kv_usage
