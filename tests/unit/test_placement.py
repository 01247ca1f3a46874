"""Placement: config keys and their errors, Ray actor options, and the can-it-ever-be-placed
check, on hand-built node lists (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdserve.config import ResourcesConfig, load_config, parse_config
from pdserve.errors import ConfigError, Unavailable
from pdserve.placement import (
    NodeView,
    actor_options,
    alive_nodes,
    label_matches,
    placement_problem,
    require_placeable,
)

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
