"""The overlays under k8s/overlays, rendered once per test session."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

from pdserve.config import PdserveConfig, load_config
from pdserve.k8s_manifest.ray_nodes import group_node, group_nodes
from pdserve.k8s_manifest.raycluster_checks import ROUTER_NODE
from pdserve.placement import NodeView
from tests.k8s_support.kustomize import build

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")


def overlay_dir(name: str) -> Path:
    return K8S / "overlays" / name


def overlay_config(name: str) -> PdserveConfig:
    return load_config(overlay_dir(name) / "config.yaml")


def rendered(name: str) -> list[dict[str, Any]]:
    """A fresh deep copy of the overlay's objects (tests may mutate it)."""
    return copy.deepcopy(_rendered(name))


@cache
def _rendered(name: str) -> list[dict[str, Any]]:
    return build(overlay_dir(name))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (and `name`, if given); fails the test if not exactly one."""
    found = [
        obj for obj in objects
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def worker_group(raycluster: dict[str, Any], group_name: str) -> dict[str, Any]:
    groups = [g for g in raycluster["spec"]["workerGroupSpecs"] if g["groupName"] == group_name]
    assert len(groups) == 1, f"expected one worker group {group_name}"
    return groups[0]


def cluster_nodes(objects: list[dict[str, Any]], joined: tuple[str, ...]) -> list[NodeView]:
    """The Ray nodes of the rendered RayCluster once the head and the `joined` groups are up."""
    spec = find(objects, "RayCluster")["spec"]
    nodes = [group_node(spec["headGroupSpec"], "head"), ROUTER_NODE]
    for name in joined:
        group = worker_group({"spec": spec}, name)
        nodes += group_nodes(group, group["replicas"], name)
    return nodes


class FakeClock:
    """Time that passes only when `sleep` is called."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
