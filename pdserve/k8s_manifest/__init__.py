"""Keeps the Kubernetes manifests (k8s/) in step with the pdserve config they deploy.

`plan_worker_groups(config)` says what the KubeRay worker groups must look like for a config;
`pools_patch(config)` renders it as the JSON 6902 patch each overlay keeps (pools-patch.yaml);
`check_manifests(config, objects)` lists every way rendered manifests disagree with the config.
Torch-free and Ray-free; the command line is `python -m pdserve.k8s_manifest`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pdserve.config import PdserveConfig
from pdserve.k8s_manifest.plan import (
    POOL_LABEL,
    POOLS,
    WorkerGroupPlan,
    format_amount,
    plan_worker_groups,
    pools_patch,
    pools_patch_yaml,
)
from pdserve.k8s_manifest.raycluster_checks import check_raycluster
from pdserve.k8s_manifest.router_checks import check_router

__all__ = [
    "POOLS",
    "POOL_LABEL",
    "WorkerGroupPlan",
    "check_manifests",
    "check_raycluster",
    "check_router",
    "format_amount",
    "plan_worker_groups",
    "pools_patch",
    "pools_patch_yaml",
]


def check_manifests(config: PdserveConfig, objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every disagreement between `config` and rendered manifests (one RayCluster, the router
    Deployment and Services), one sentence each; [] when they are in step. Pure."""
    clusters = [obj for obj in objects if obj.get("kind") == "RayCluster"]
    if len(clusters) != 1:
        return [f"expected one RayCluster, found {len(clusters)}"]
    return check_raycluster(config, clusters[0]) + check_router(config, objects)
