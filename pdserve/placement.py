"""Where replicas run: Ray actor options built from a pool's `resources` section, the syntax of
its custom resources and node labels, and a check that the cluster can host every pool.

Ray keeps an actor pending forever while no node offers what it asks for (a custom resource, a
label, too many CPUs), so `pdserve serve` would only notice at the start timeout. Instead
`create_pools` calls `require_placeable` first, which names the pool and what no node offers;
live scaling (`router.live_scaling`) runs the same check, through `unplaceable_message`, before
a scale-up starts a replica. The check sees the nodes alive now: a cluster that adds nodes on
demand (an autoscaler) must have the right kind of node up before `pdserve serve` starts or a
pool grows.

Torch-free and Ray-free: callers pass `ray.nodes()` in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from pdserve.errors import Unavailable

if TYPE_CHECKING:
    from pdserve.config import ResourcesConfig

# Ray counts resources in fixed-point units of 1/10000.
_UNITS_PER_RESOURCE = 10_000
# Kubernetes label syntax, which Ray enforces: a name (or value) of at most 63 characters, and a
# key that may carry a dotted prefix ending in "/".
_LABEL_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?:{_LABEL_NAME}(?:\.{_LABEL_NAME})*/)?{_LABEL_NAME}")
# A selector value: `v`, `!v`, `in(a,b)` or `!in(a,b)`.
_LABEL_SELECTOR = re.compile(rf"!?(?:{_LABEL_NAME}|in\({_LABEL_NAME}(?:, ?{_LABEL_NAME})*\))")


def _resource_name(name: str) -> str:
    if name in ("CPU", "GPU"):
        raise PydanticCustomError(
            "placement", "{name} is set with num_cpus / num_gpus, not as a custom resource",
            {"name": name},
        )
    if not name or len(name) > 256 or not name.isprintable() or any(c.isspace() for c in name):
        raise PydanticCustomError(
            "placement", "a resource name is 1-256 printable characters without spaces"
        )
    return name


def _resource_amount(amount: float) -> float:
    if 0 < amount < 1 / _UNITS_PER_RESOURCE:
        raise PydanticCustomError("placement", "Ray counts resources in steps of 0.0001")
    return amount


def _label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if len(prefix) > 253 or len(name) > 63 or not _LABEL_KEY.fullmatch(key):
        raise PydanticCustomError(
            "placement",
            "a label key is [prefix/]name: a name of 1-63 letters, digits, '-', '_' or '.' "
            "starting and ending with a letter or digit, after an optional dotted prefix",
        )
    return key


def _label_selector(value: str) -> str:
    if not _LABEL_SELECTOR.fullmatch(value):
        raise PydanticCustomError(
            "placement",
            "a label selector is v, !v, in(a,b) or !in(a,b), each value 1-63 letters, digits, "
            "'-', '_' or '.' starting and ending with a letter or digit",
        )
    return value


# Field types of `ResourcesConfig`: errors name the key path down to the offending entry.
ResourceName = Annotated[str, AfterValidator(_resource_name)]
ResourceAmount = Annotated[
    float, Field(ge=0, allow_inf_nan=False), AfterValidator(_resource_amount)
]
LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelSelector = Annotated[str, AfterValidator(_label_selector)]


def actor_options(resources: ResourcesConfig) -> dict[str, Any]:
    """Keyword arguments for `ray.remote(cls).options(...)` that place one replica: CPUs, GPUs,
    custom resources, label selector and scheduling strategy. Called by `pdserve.pools`."""
    options: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    custom = {name: amount for name, amount in resources.custom_resources.items() if amount > 0}
    if custom:
        options["resources"] = custom
    if resources.node_labels:
        options["label_selector"] = dict(resources.node_labels)
    if resources.placement_strategy == "spread":
        options["scheduling_strategy"] = "SPREAD"
    return options


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know of one alive Ray node: its total resources and labels."""

    node_id: str
    resources: Mapping[str, float]
    labels: Mapping[str, str]


def alive_nodes(ray_nodes: list[dict[str, Any]]) -> list[NodeView]:
    """The alive nodes of a `ray.nodes()` answer."""
    return [
        NodeView(
            node_id=str(node.get("NodeID", "")),
            resources=dict(node.get("Resources") or {}),
            labels=dict(node.get("Labels") or {}),
        )
        for node in ray_nodes
        if node.get("Alive")
    ]


class PoolConfig(Protocol):
    """What placement reads of a pool's section (prefill, decode, colocated)."""

    @property
    def replicas(self) -> int: ...

    @property
    def resources(self) -> ResourcesConfig: ...


def require_placeable(pools: Mapping[str, PoolConfig], nodes: list[NodeView]) -> None:
    """Raises Unavailable, naming the pool (its config key) and what no node offers, when one of
    `pools` could never be placed on `nodes`, even on an otherwise empty cluster.

    Called by `pdserve.pools` before it creates any actor; never blocks."""
    for pool, pool_config in pools.items():
        message = unplaceable_message(pool, pool_config.resources, pool_config.replicas, nodes)
        if message is not None:
            raise Unavailable(message)


def unplaceable_message(
    pool: str, resources: ResourcesConfig, num_replicas: int, nodes: list[NodeView]
) -> str | None:
    """For the operator: why `num_replicas` replicas of `pool` (its config key) could never be
    placed on `nodes`, naming the pool, what no node offers and what to change; None when they
    can be. The caller picks the error type (start-up and scale-up fail differently)."""
    problem = placement_problem(resources, num_replicas, nodes)
    if problem is None:
        return None
    return (
        f"the {pool} pool can never be placed on this Ray cluster ({len(nodes)} alive nodes): "
        f"{problem}; change {pool}.resources or add a node that offers it"
    )


def placement_problem(
    resources: ResourcesConfig, num_replicas: int, nodes: list[NodeView]
) -> str | None:
    """Why `num_replicas` replicas with `resources` cannot all fit on `nodes` at once, or None."""
    demand = _demand(resources)
    eligible = [
        node for node in nodes
        if _fits(demand, node.resources) and _matches_all(resources.node_labels, node.labels)
    ]
    if not eligible:
        return _why_no_node(demand, resources.node_labels, nodes)
    capacity = [_num_slots(demand, node.resources) for node in eligible]
    if None in capacity:
        return None
    total = sum(slots for slots in capacity if slots is not None)
    if total < num_replicas:
        return (
            f"{num_replicas} replicas need {_show_demand(demand)} each, but the nodes that "
            f"qualify hold at most {total} even with nothing else on them"
        )
    return None


def label_matches(selector: str, value: str | None) -> bool:
    """Whether a node label `value` (None: the node lacks the key) satisfies a selector value
    (`v`, `!v`, `in(a,b)`, `!in(a,b)`); negations match nodes without the key, as in Ray."""
    negated = selector.startswith("!")
    body = selector[1:] if negated else selector
    if body.startswith("in(") and body.endswith(")"):
        wanted = {part.strip() for part in body[3:-1].split(",")}
    else:
        wanted = {body}
    return (value not in wanted) if negated else (value in wanted)


def _demand(resources: ResourcesConfig) -> dict[str, int]:
    """Per-replica demand in Ray's fixed-point units; zero amounts ask for nothing."""
    amounts = {"CPU": resources.num_cpus, "GPU": resources.num_gpus}
    amounts.update(resources.custom_resources)
    units = {name: _units(amount) for name, amount in amounts.items()}
    return {name: amount for name, amount in units.items() if amount > 0}


def _units(amount: float) -> int:
    return round(amount * _UNITS_PER_RESOURCE)


def _fits(demand: dict[str, int], offered: Mapping[str, float]) -> bool:
    return all(_units(offered.get(name, 0.0)) >= amount for name, amount in demand.items())


def _matches_all(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(label_matches(value, labels.get(key)) for key, value in selector.items())


def _num_slots(demand: dict[str, int], offered: Mapping[str, float]) -> int | None:
    """Replicas one empty node holds; None = unbounded (the replica asks for nothing)."""
    if not demand:
        return None
    return min(_units(offered.get(name, 0.0)) // amount for name, amount in demand.items())


def _why_no_node(
    demand: dict[str, int], selector: Mapping[str, str], nodes: list[NodeView]
) -> str:
    reasons = []
    for name, amount in demand.items():
        most = max((_units(node.resources.get(name, 0.0)) for node in nodes), default=0)
        if most < amount:
            reasons.append(
                f"each replica needs {_show_units(amount)} {name!r} and no node offers "
                + ("any" if most == 0 else f"more than {_show_units(most)}")
            )
    for key, value in selector.items():
        if not any(label_matches(value, node.labels.get(key)) for node in nodes):
            seen = sorted({node.labels[key] for node in nodes if key in node.labels})
            reasons.append(
                f"no node has a label {key} matching {value!r} "
                f"(values on nodes: {', '.join(seen) if seen else 'none'})"
            )
    if not reasons:
        labels = ", ".join(f"{key}={value}" for key, value in selector.items()) or "none"
        reasons.append(
            f"no single node offers {_show_demand(demand)} together with labels {labels}"
        )
    return "; ".join(reasons)


def _show_demand(demand: dict[str, int]) -> str:
    shown = [f"{_show_units(amount)} {name}" for name, amount in demand.items()]
    return ", ".join(shown) or "nothing"


def _show_units(units: int) -> str:
    return f"{units / _UNITS_PER_RESOURCE:g}"
