"""Schema validation of rendered Kubernetes objects, offline.

Core objects (Deployment, Service, ConfigMap, PodDisruptionBudget, ...) are checked against
`kubernetes-validate`'s strict schemas (unknown fields rejected): the same files its
`validate()` reads, loaded once here because it re-reads the 1.8 MB definitions per call.
The custom resources are checked against the hand-kept subsets in k8s/schemas/, whose pod
templates and metadata refer to the same strict core definitions.
"""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

# The oldest Kubernetes release the manifests target (gRPC probes: 1.24+; KubeRay 1.5: 1.28+).
KUBERNETES_VERSION = "1.33"
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "k8s" / "schemas"
CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray-v1.subset.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.subset.json",
}
_CORE_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"


class ManifestInvalid(Exception):
    """A rendered object its schema rejects (or one no schema covers)."""


def validate_object(obj: dict[str, Any]) -> None:
    """Raises ManifestInvalid naming the object, the field path and the reason."""
    name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    validator = _validator(str(obj.get("apiVersion")), str(obj.get("kind")))
    if validator is None:
        raise ManifestInvalid(f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')}")
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        path = ".".join(str(part) for part in error.absolute_path) or "<root>"
        raise ManifestInvalid(f"{name}: {path}: {error.message}")


@cache
def _validator(api_version: str, kind: str) -> jsonschema.Validator | None:
    custom = CUSTOM_SCHEMAS.get((api_version, kind))
    if custom is not None:
        schema = json.loads((SCHEMA_DIR / custom).read_text(encoding="utf-8"))
    else:
        # kubernetes-validate's file naming: apps/v1 -> apps-v1, policy/v1 -> policy-v1.
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        path = _core_schema_dir() / f"{kind.lower()}-{group_version}.json"
        if not path.is_file():
            return None
        schema = json.loads(path.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema, registry=_registry())


def _core_schema_dir() -> Traversable:
    folder = f"v{KUBERNETES_VERSION}.0-local-strict"
    return resources.files("kubernetes_validate") / "kubernetes-json-schema" / folder


@lru_cache(maxsize=1)
def _registry() -> Registry:
    definitions = json.loads((_core_schema_dir() / "_definitions.json").read_text("utf-8"))
    return Registry().with_resource(_CORE_DEFINITIONS, Resource.from_contents(definitions))
