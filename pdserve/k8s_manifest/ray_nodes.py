"""The Ray nodes a RayCluster manifest will start, as `pdserve.placement.NodeView`s.

KubeRay turns each pod into one Ray node: its logical CPUs are `rayStartParams["num-cpus"]`
or the container's CPU limit rounded up (else its request), its GPUs `num-gpus` or the
`nvidia.com/gpu` limit, plus the group's `resources` map (which overrides both) and its
`labels`. Reading the manifest this way lets the checks ask pdserve's own placement logic
where each pool's replicas can land.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pdserve.placement import NodeView

GPU_RESOURCE = "nvidia.com/gpu"
_CPU_SUFFIXES = {"m": 1e-3, "": 1.0}


def group_nodes(group: Mapping[str, Any], num_pods: int, name: str) -> list[NodeView]:
    """`num_pods` identical nodes of one head or worker group spec."""
    node = group_node(group, name)
    return [
        NodeView(node_id=f"{name}-{i}", resources=node.resources, labels=node.labels)
        for i in range(num_pods)
    ]


def group_node(group: Mapping[str, Any], name: str) -> NodeView:
    """The Ray node one pod of a head or worker group spec becomes."""
    params = group.get("rayStartParams") or {}
    container = _ray_container(group)
    requirements = container.get("resources") or {}
    limits = requirements.get("limits") or {}
    requests = requirements.get("requests") or {}
    resources: dict[str, float] = {
        "CPU": _param_or(params, "num-cpus", _ray_cpus(limits.get("cpu", requests.get("cpu")))),
        "GPU": _param_or(params, "num-gpus", float(limits.get(GPU_RESOURCE, 0))),
    }
    resources.update({key: float(value) for key, value in (group.get("resources") or {}).items()})
    labels = {str(key): str(value) for key, value in (group.get("labels") or {}).items()}
    return NodeView(node_id=name, resources=resources, labels=labels)


def parse_cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("2", "500m", 1.5) in cores. Raises ValueError otherwise."""
    text = str(quantity).strip()
    suffix = "m" if text.endswith("m") else ""
    number = float(text[: len(text) - len(suffix)])
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"not a CPU quantity: {quantity!r}")
    return number * _CPU_SUFFIXES[suffix]


def _ray_cpus(quantity: str | int | float | None) -> float:
    # KubeRay rounds fractional CPU limits up before handing them to `ray start`.
    return 0.0 if quantity is None else float(math.ceil(parse_cpu(quantity)))


def _param_or(params: Mapping[str, Any], key: str, default: float) -> float:
    return float(params[key]) if key in params else default


def _ray_container(group: Mapping[str, Any]) -> Mapping[str, Any]:
    # KubeRay runs Ray in the pod's first container.
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]
