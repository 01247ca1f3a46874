"""Placement: config keys and their errors, Ray actor options, and the can-it-ever-be-placed
check, on hand-built node lists (no Ray); and that same check gating live scale-ups (Admin.Scale
and the autoscaler), with the fake replicas of `test_pool_scaler`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from pdserve.config import ResourcesConfig, load_config, parse_config
from pdserve.errors import ConfigError, FailedPrecondition, Unavailable
from pdserve.placement import (
    NodeView,
    actor_options,
    alive_nodes,
    label_matches,
    placement_problem,
    require_placeable,
)
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from router.admin_servicer import AdminServicer
from router.autoscale_loop import AutoscaleLoop
from router.autoscaler import decode_autoscaler
from router.live_scaling import placement_check
from router.replica_pool import DRAINING, READY
from router.scaling import ScaleController, pool_limits
from router.wait_queue import DECODE_BLOCKS
from tests.unit.test_pool_scaler import FakeFactory, make_pool, make_scaler, states

ROLE = "pdserve/role"


def _node(role: str | None, cpus: float = 2, **custom: float) -> NodeView:
    labels = {ROLE: role} if role else {}
    return NodeView(node_id=role or "head", resources={"CPU": cpus, **custom}, labels=labels)


NODES = [
    _node(None, cpus=1),
    _node("prefill", pdserve_prefill=4),
    _node("decode", pdserve_decode=4),
]


def _resources(**fields: Any) -> ResourcesConfig:
    return parse_config({"decode": {"resources": fields}}).decode.resources


class _Pool:
    def __init__(self, replicas: int = 1, **fields: Any) -> None:
        self.replicas = replicas
        self.resources = _resources(**fields)


def test_yaml_integers_load_into_the_strict_float_mapping(tmp_path: Path) -> None:
    path = tmp_path / "placed.yaml"
    path.write_text(
        "prefill:\n  resources:\n    custom_resources: {pdserve_prefill: 1, fast_disk: 0.5}\n"
        "    node_labels: {pdserve/role: prefill, zone: '!in(a,b)'}\n"
        "    placement_strategy: spread\n"
    )
    resources = load_config(path).prefill.resources
    assert resources.custom_resources == {"pdserve_prefill": 1.0, "fast_disk": 0.5}
    assert resources.node_labels == {ROLE: "prefill", "zone": "!in(a,b)"}
    assert resources.placement_strategy == "spread"


def test_defaults_ask_only_for_cpus_and_gpus() -> None:
    assert actor_options(ResourcesConfig()) == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_options_carry_resources_labels_and_spread() -> None:
    resources = _resources(
        num_cpus=2, custom_resources={"pdserve_prefill": 1, "unused": 0},
        node_labels={ROLE: "prefill"}, placement_strategy="spread",
    )
    assert actor_options(resources) == {
        "num_cpus": 2.0,
        "num_gpus": 0.0,
        "resources": {"pdserve_prefill": 1.0},
        "label_selector": {ROLE: "prefill"},
        "scheduling_strategy": "SPREAD",
    }


@pytest.mark.parametrize(
    ("fields", "key", "problem"),
    [
        ({"custom_resources": {"CPU": 1}}, "custom_resources.CPU", "num_cpus / num_gpus"),
        ({"custom_resources": {"x": -1}}, "custom_resources.x", "greater than or equal to 0"),
        ({"custom_resources": {"x": 0.00001}}, "custom_resources.x", "steps of 0.0001"),
        ({"custom_resources": {"x": ".inf"}}, "custom_resources.x", "valid number"),
        ({"custom_resources": {"a b": 1}}, "custom_resources.a b", "without spaces"),
        ({"custom_resources": [1]}, "custom_resources", "expected a mapping"),
        ({"node_labels": {"-role": "x"}}, "node_labels.-role", "a label key is"),
        ({"node_labels": {"a/b/c": "x"}}, "node_labels.a/b/c", "a label key is"),
        ({"node_labels": {"role": "in()"}}, "node_labels.role", "a label selector is"),
        ({"node_labels": {"role": ""}}, "node_labels.role", "a label selector is"),
        ({"node_labels": {"role": True}}, "node_labels.role", "valid string"),
        ({"placement_strategy": "pack"}, "placement_strategy", "'default' or 'spread'"),
    ],
)
def test_bad_placement_keys_name_the_key(fields: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"prefill": {"resources": fields}}, origin="test.yaml")
    message = str(info.value)
    assert f"prefill.resources.{key}" in message
    assert problem in message


@pytest.mark.parametrize(
    ("selector", "value", "matches"),
    [
        ("prefill", "prefill", True),
        ("prefill", "decode", False),
        ("prefill", None, False),
        ("!prefill", "decode", True),
        ("!prefill", None, True),
        ("!prefill", "prefill", False),
        ("in(a, b)", "b", True),
        ("in(a,b)", "c", False),
        ("!in(a,b)", None, True),
        ("!in(a,b)", "a", False),
    ],
)
def test_label_selector_semantics(selector: str, value: str | None, matches: bool) -> None:
    assert label_matches(selector, value) is matches


def test_only_alive_nodes_count() -> None:
    raw = [
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 1.0}, "Labels": {ROLE: "decode"}},
        {"NodeID": "b", "Alive": False, "Resources": {"CPU": 8.0}, "Labels": {}},
    ]
    assert alive_nodes(raw) == [NodeView("a", {"CPU": 1.0}, {ROLE: "decode"})]


def test_pools_that_fit_pass() -> None:
    require_placeable(
        {
            "prefill": _Pool(
                custom_resources={"pdserve_prefill": 1}, node_labels={ROLE: "prefill"}
            ),
            "decode": _Pool(replicas=2, node_labels={ROLE: "!prefill"}),
            "anywhere": _Pool(replicas=1000, num_cpus=0),
        },
        NODES,
    )


def test_a_missing_custom_resource_names_pool_and_resource() -> None:
    with pytest.raises(Unavailable) as info:
        require_placeable({"prefill": _Pool(custom_resources={"pdserve_gpu": 1})}, NODES)
    message = info.value.message
    assert "the prefill pool can never be placed" in message
    assert "'pdserve_gpu'" in message and "no node offers any" in message
    assert "3 alive nodes" in message and "prefill.resources" in message


def test_too_large_an_amount_says_the_most_one_node_offers() -> None:
    problem = placement_problem(_resources(num_cpus=3), 1, NODES)
    assert problem == "each replica needs 3 'CPU' and no node offers more than 2"


def test_a_missing_label_lists_the_values_nodes_have() -> None:
    problem = placement_problem(_resources(node_labels={ROLE: "gpu"}), 1, NODES)
    assert problem == (
        "no node has a label pdserve/role matching 'gpu' (values on nodes: decode, prefill)"
    )
    problem = placement_problem(_resources(node_labels={"zone": "a"}), 1, NODES)
    assert problem is not None and "(values on nodes: none)" in problem


def test_requirements_met_only_on_different_nodes() -> None:
    resources = _resources(custom_resources={"pdserve_prefill": 1}, node_labels={ROLE: "decode"})
    problem = placement_problem(resources, 1, NODES)
    assert problem is not None and problem.startswith("no single node offers")
    assert "1 pdserve_prefill" in problem and "pdserve/role=decode" in problem


def test_more_replicas_than_the_qualifying_nodes_hold() -> None:
    resources = _resources(custom_resources={"pdserve_decode": 1})
    # The decode node has 2 CPUs (1 per replica) and 4 pdserve_decode: CPUs bound it at 2.
    assert placement_problem(resources, 2, NODES) is None
    problem = placement_problem(resources, 3, NODES)
    assert problem is not None and "3 replicas" in problem and "at most 2" in problem


def test_fractional_amounts_count_in_ray_units() -> None:
    resources = _resources(num_cpus=0.1)
    # 0.1 CPU x 10 = 1 CPU exactly: no floating-point shortfall on the 1-CPU head node alone.
    assert placement_problem(resources, 10, [_node(None, cpus=1)]) is None
    assert placement_problem(resources, 11, [_node(None, cpus=1)]) is not None


def test_no_alive_node_at_all() -> None:
    problem = placement_problem(_resources(), 1, [])
    assert problem == "each replica needs 1 'CPU' and no node offers any"


# Both pools fit on their own node only, 2 replicas each (the nodes' 2 CPUs bound them).
SCALED = parse_config(
    {
        "prefill": {"resources": {"custom_resources": {"pdserve_prefill": 1}}},
        "decode": {
            "resources": {"node_labels": {ROLE: "decode"}},
            "autoscale": {"enabled": True, "max_replicas": 3, "cooldown_s": 0},
        },
    }
)


async def test_a_grow_no_node_can_host_is_refused_and_starts_nothing() -> None:
    pool, _ = await make_pool("decode-0")
    factory = FakeFactory()
    nodes = list(NODES)
    scaler = make_scaler(pool, factory, check_placement=placement_check(SCALED, lambda: nodes))
    with pytest.raises(FailedPrecondition) as info:
        scaler.set_target(3)
    message = info.value.message
    assert "the decode pool can never be placed" in message and "decode.resources" in message
    assert "3 replicas need 1 CPU each" in message and "at most 2" in message
    assert factory.created == {} and pool.target_replicas == 1
    assert list(states(pool)) == ["decode-0"]
    nodes.pop()  # the decode node left the cluster: the check reads the nodes alive now
    with pytest.raises(FailedPrecondition) as info:
        scaler.set_target(2)
    assert "no node has a label pdserve/role matching 'decode'" in info.value.message
    nodes.append(NODES[-1])
    scaler.set_target(2)
    assert list(factory.created) == ["decode-1"] and pool.target_replicas == 2
    await scaler.stop()


async def test_shrinking_or_taking_back_a_drain_never_checks_placement() -> None:
    pool, _ = await make_pool("decode-0", "decode-1")
    factory = FakeFactory()
    checked: list[tuple[str, int]] = []

    def refuse(role: str, num_replicas: int) -> None:
        checked.append((role, num_replicas))
        raise FailedPrecondition("no node")

    scaler = make_scaler(pool, factory, check_placement=refuse)
    scaler.set_target(1)
    (draining,) = [rid for rid, state in states(pool).items() if state == DRAINING]
    scaler.set_target(2)  # takes the draining replica back: no new actor
    assert states(pool)[draining] == READY
    scaler.set_target(1)
    assert checked == [] and factory.created == {}
    with pytest.raises(FailedPrecondition):
        scaler.set_target(3)  # one new actor: checked
    assert checked == [("decode", 3)] and factory.created == {} and pool.target_replicas == 1
    await scaler.stop()


async def test_admin_scale_to_an_unplaceable_size_fails_and_changes_no_pool() -> None:
    prefill, _ = await make_pool("prefill-0")
    decode, _ = await make_pool("decode-0")
    factory = FakeFactory()
    check = placement_check(SCALED, lambda: NODES)
    controller = ScaleController(
        {
            "prefill": make_scaler(prefill, factory, check_placement=check),
            "decode": make_scaler(decode, factory, check_placement=check),
        },
        {role: pool_limits(SCALED, role) for role in ("prefill", "decode")},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdminServicer(controller).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdserve_pb2_grpc.AdminStub(channel)
            request = pdserve_pb2.ScaleRequest(target_replicas={"prefill": 2, "decode": 3})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Scale(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert caught.value.details().startswith("the decode pool can never be placed")
            assert factory.created == {}
            assert controller.targets() == {"prefill": 1, "decode": 1}
    finally:
        await server.stop(None)
        await controller.stop()


async def test_the_autoscaler_warns_and_keeps_the_size_when_a_grow_cannot_be_placed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool, actors = await make_pool("decode-0")
    actors["decode-0"].num_used_blocks = 95  # KV usage 0.95 > scale_up_kv_usage 0.8
    await pool.poll_once()
    factory = FakeFactory()
    # Only the head and the prefill node are alive: no node has the decode label.
    check = placement_check(SCALED, lambda: NODES[:2])
    controller = ScaleController(
        {"decode": make_scaler(pool, factory, check_placement=check)},
        {"decode": pool_limits(SCALED, "decode")},
    )
    loop = AutoscaleLoop(
        controller, {"decode": pool}, {"decode": decode_autoscaler(SCALED.decode.autoscale)}, 1.0
    )
    with caplog.at_level(logging.WARNING, logger="router.autoscale_loop"):
        assert loop.step(now=100.0) == {}
    assert factory.created == {} and pool.target_replicas == 1
    (record,) = [r for r in caplog.records if r.name == "router.autoscale_loop"]
    assert record.levelno == logging.WARNING
    assert "not scaling decode to 2 replicas" in record.getMessage()
    assert "no node has a label pdserve/role matching 'decode'" in record.getMessage()
    await controller.stop()


async def test_the_autoscaler_grows_decode_for_requests_queued_for_decode_blocks() -> None:
    pool, actors = await make_pool("decode-0")
    actors["decode-0"].num_used_blocks = 50  # KV usage 0.5: below scale_up_kv_usage 0.8
    actors["decode-0"].num_active_requests = 5
    await pool.poll_once()
    factory = FakeFactory()
    controller = ScaleController(
        {"decode": make_scaler(pool, factory)}, {"decode": pool_limits(SCALED, "decode")}
    )
    depth = {DECODE_BLOCKS: 0}
    loop = AutoscaleLoop(
        controller, {"decode": pool}, {"decode": decode_autoscaler(SCALED.decode.autoscale)},
        1.0, queue_depth=lambda: depth,
    )
    assert loop.step(now=100.0) == {}
    # 5 requests wait for decode blocks, 10 blocks each as the running ones: (50 + 50) / 100.
    depth[DECODE_BLOCKS] = 5
    decision = loop.step(now=200.0)["decode"]
    assert decision.target_replicas == 2 and "5 queued in the router" in decision.reason
    assert pool.target_replicas == 2
    await controller.stop()
