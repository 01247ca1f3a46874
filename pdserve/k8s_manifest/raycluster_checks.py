"""Does a RayCluster manifest give a pdserve config's pools the nodes they need?

Worker groups must match `plan_worker_groups` (sizes, Ray resources and labels: the pools
patch is in step with the config), each pool's replicas must fit on its own group's pods
(judged by `pdserve.placement`, as `pdserve serve` will) and on no other node: not the head,
not the router's node, not the other pool's pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdserve.config import PdserveConfig
from pdserve.k8s_manifest.plan import WorkerGroupPlan, plan_worker_groups
from pdserve.k8s_manifest.ray_nodes import group_node, group_nodes
from pdserve.placement import NodeView, placement_problem

# The node the router's pod adds to the cluster (`ray start --num-cpus=0 --num-gpus=0`, no
# custom resources or labels); `router_checks` checks the command line that makes it so.
ROUTER_NODE = NodeView(node_id="router", resources={"CPU": 0.0, "GPU": 0.0}, labels={})


def check_raycluster(config: PdserveConfig, raycluster: Mapping[str, Any]) -> list[str]:
    """Every way the RayCluster disagrees with `config`, one sentence each ([] = in step)."""
    spec = raycluster.get("spec") or {}
    groups = {group.get("groupName"): group for group in spec.get("workerGroupSpecs") or []}
    problems: list[str] = []
    plans = plan_worker_groups(config)
    for plan in plans:
        group = groups.get(plan.group_name)
        if group is None:
            problems.append(f"the RayCluster has no worker group {plan.group_name!r}")
            continue
        problems += _check_group_fields(plan, group)
        problems += _check_pool_fits(config, plan, group)
    strangers = [group_node(spec.get("headGroupSpec") or {}, "the Ray head"), ROUTER_NODE]
    strangers += [group_node(group, f"a {name} pod") for name, group in groups.items()]
    for plan in plans:
        problems += _check_pool_pinned(config, plan.group_name, strangers)
    return problems


def _check_group_fields(plan: WorkerGroupPlan, group: Mapping[str, Any]) -> list[str]:
    name = plan.group_name
    problems = [
        f"worker group {name}: {field} is {group.get(field)!r}, the config asks for {wanted}"
        for field, wanted in (
            ("replicas", plan.num_replicas),
            ("minReplicas", plan.min_replicas),
            ("maxReplicas", plan.max_replicas),
        )
        if group.get(field) != wanted
    ]
    resources = group.get("resources") or {}
    for key, amount in plan.ray_resources.items():
        if key not in resources or float(resources[key]) != float(amount):
            problems.append(
                f"worker group {name}: resources[{key!r}] is {resources.get(key)!r}, one "
                f"{name} replica reserves {amount} (one replica per pod)"
            )
    labels = group.get("labels") or {}
    for key, value in plan.ray_labels.items():
        if labels.get(key) != value:
            problems.append(
                f"worker group {name}: labels[{key!r}] is {labels.get(key)!r}, expected {value!r}"
            )
    return problems


def _check_pool_fits(
    config: PdserveConfig, plan: WorkerGroupPlan, group: Mapping[str, Any]
) -> list[str]:
    name = plan.group_name
    resources = getattr(config, name).resources
    problems = []
    for num_replicas, when in ((plan.num_replicas, "at start"), (plan.max_replicas, "at most")):
        nodes = group_nodes(group, num_replicas, name)
        problem = placement_problem(resources, num_replicas, nodes)
        if problem is not None:
            problems.append(
                f"{num_replicas} {name} pods cannot host the {num_replicas} {name} replicas "
                f"needed {when}: {problem}"
            )
    one_pod = group_nodes(group, 1, name)
    if config.metrics.enabled and placement_problem(resources, 2, one_pod) is None:
        problems.append(
            f"one {name} pod can host two {name} replicas, whose metrics.replica_port would "
            f"collide: make each pod offer exactly one replica's custom resources"
        )
    return problems


def _check_pool_pinned(config: PdserveConfig, name: str, strangers: list[NodeView]) -> list[str]:
    resources = getattr(config, name).resources
    return [
        f"{name} replicas could be placed on {node.node_id}: give the {name} pool a custom "
        f"resource or node label that only {name} pods offer"
        for node in strangers
        if node.node_id != f"a {name} pod" and placement_problem(resources, 1, [node]) is None
    ]
