"""The KubeRay worker groups a pdserve config needs, and the patch that sizes them.

One pdserve replica per worker pod: a worker group advertises, per pod, exactly the custom
resources one replica of its pool reserves (`<pool>.resources.custom_resources`), and carries
Ray node labels that satisfy the pool's `node_labels` selector. Pod counts follow the pool:
`replicas` pods to start with, bounded by the pool's scaling range (`autoscale.min_replicas`
and the larger of `replicas` and `autoscale.max_replicas`, the cap of `pdserve scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from pdserve.config import PdserveConfig
from pdserve.errors import ConfigError

# Worker groups in the order k8s/base/raycluster.yaml lists them (the patch addresses them by
# index and guards each index with a `test` op on the group name).
POOLS = ("prefill", "decode")
# Ray node label every worker group carries, naming its pool.
POOL_LABEL = "pdserve.io/pool"


@dataclass(frozen=True)
class WorkerGroupPlan:
    """What one KubeRay worker group must look like for one pdserve pool."""

    group_name: str
    # Worker pods to start with (one replica each).
    num_replicas: int
    min_replicas: int
    max_replicas: int
    # The group's Ray custom resources per pod (KubeRay `resources`; values are strings).
    ray_resources: dict[str, str]
    # The group's Ray node labels (KubeRay `labels`).
    ray_labels: dict[str, str]


def plan_worker_groups(config: PdserveConfig) -> list[WorkerGroupPlan]:
    """The prefill and decode worker groups `config` needs, in base order. Pure.

    Raises ConfigError for a colocated config (the manifests run the two disaggregated pools).
    """
    if config.mode != "disaggregated":
        raise ConfigError(
            f"mode: the Kubernetes manifests run the prefill and decode pools; "
            f"mode {config.mode!r} is not covered"
        )
    return [_plan(name, getattr(config, name)) for name in POOLS]


def pools_patch(config: PdserveConfig) -> list[dict[str, Any]]:
    """JSON 6902 operations that set each worker group of the base RayCluster from `config`."""
    ops: list[dict[str, Any]] = []
    for index, plan in enumerate(plan_worker_groups(config)):
        group = f"/spec/workerGroupSpecs/{index}"
        ops.append({"op": "test", "path": f"{group}/groupName", "value": plan.group_name})
        ops.append({"op": "replace", "path": f"{group}/replicas", "value": plan.num_replicas})
        ops.append({"op": "replace", "path": f"{group}/minReplicas", "value": plan.min_replicas})
        ops.append({"op": "replace", "path": f"{group}/maxReplicas", "value": plan.max_replicas})
        ops.append({"op": "add", "path": f"{group}/resources", "value": plan.ray_resources})
        ops.append({"op": "add", "path": f"{group}/labels", "value": plan.ray_labels})
    return ops


def pools_patch_yaml(config: PdserveConfig, config_path: str) -> str:
    """`pools_patch` as the YAML file an overlay keeps next to its config."""
    header = (
        "# The worker groups' sizes, Ray custom resources and labels, generated from the\n"
        f"# config by `python -m pdserve.k8s_manifest pools-patch {config_path}`.\n"
        "# Do not edit: change the config and regenerate (a test checks the two agree).\n"
    )
    return header + yaml.safe_dump(pools_patch(config), sort_keys=False)


def format_amount(amount: float) -> str:
    """A Ray resource amount as KubeRay wants it: a string, integral amounts without '.0'."""
    return str(int(amount)) if float(amount).is_integer() else repr(float(amount))


def _plan(name: str, pool: Any) -> WorkerGroupPlan:
    resources = pool.resources
    ray_resources = {
        key: format_amount(amount) for key, amount in resources.custom_resources.items()
        if amount > 0
    }
    labels = {POOL_LABEL: name}
    for key, selector in resources.node_labels.items():
        value = _label_satisfying(selector)
        if value is not None:
            labels[key] = value
    return WorkerGroupPlan(
        group_name=name,
        num_replicas=pool.replicas,
        min_replicas=min(pool.replicas, pool.autoscale.min_replicas),
        max_replicas=max(pool.replicas, pool.autoscale.max_replicas),
        ray_resources=ray_resources,
        ray_labels=labels,
    )


def _label_satisfying(selector: str) -> str | None:
    """A label value that satisfies a Ray selector value (`v`, `in(a,b)`); None for negations,
    which a node without the key already satisfies."""
    if selector.startswith("!"):
        return None
    if selector.startswith("in(") and selector.endswith(")"):
        return selector[3:-1].split(",")[0].strip()
    return selector
