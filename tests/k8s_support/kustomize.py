"""A minimal, offline `kustomize build` for the features k8s/ uses, and nothing else.

Supported kustomization fields: `resources` (files and directories), `labels` (pairs added to
metadata.labels only), `configMapGenerator` (files and literals; names get kustomize's content
hash suffix and references to them in pod specs follow), `patches` holding JSON 6902
operations with a `target`, and `images`. Any other field, a strategic-merge patch or an
unsupported option raises KustomizeError, so a manifest change the tests cannot render fails
loudly instead of being skipped. A test compares the output with `kubectl kustomize` when a
kubectl binary is on PATH.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "labels", "configMapGenerator", "patches", "images",
}
# kustomize's hash encoding maps these hex digits to letters (avoids bad words and numbers).
_HASH_LETTERS = str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"})


class KustomizeError(Exception):
    """A kustomization this renderer cannot (or must not) render."""


def build(directory: str | Path) -> list[dict[str, Any]]:
    """Renders the kustomization in `directory` (and its bases) into a list of objects."""
    objects, renames = _build(Path(directory))
    for obj in objects:
        _rename_config_map_refs(obj, renames)
    return objects


def _build(directory: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    kustomization = _load_kustomization(directory)
    objects: list[dict[str, Any]] = []
    renames: dict[str, str] = {}
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            sub_objects, sub_renames = _build(path)
            objects += sub_objects
            renames.update(sub_renames)
        else:
            objects += _load_objects(path)
    for generator in kustomization.get("configMapGenerator", []):
        config_map = _generate_config_map(directory, generator)
        renames[generator["name"]] = config_map["metadata"]["name"]
        objects.append(config_map)
    for patch in kustomization.get("patches", []):
        _apply_patch(directory, patch, objects)
    for label_set in kustomization.get("labels", []):
        _add_labels(label_set, objects)
    for image in kustomization.get("images", []):
        for obj in objects:
            _set_image(obj, image)
    return objects, renames


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            unknown = set(data) - SUPPORTED_FIELDS
            if unknown:
                raise KustomizeError(f"{path}: fields not supported here: {sorted(unknown)}")
            return data
    raise KustomizeError(f"no kustomization file in {directory}")


def _load_objects(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise KustomizeError(f"resource {path} does not exist")
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise KustomizeError(f"{path}: not a Kubernetes object: {str(doc)[:80]}")
    return docs


def _generate_config_map(directory: Path, generator: dict[str, Any]) -> dict[str, Any]:
    unknown = set(generator) - {"name", "files", "literals"}
    if unknown:
        raise KustomizeError(f"configMapGenerator options not supported: {sorted(unknown)}")
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for entry in generator.get("files", []):
        key, sep, source = entry.partition("=")
        path = directory / (source if sep else key)
        data[key if sep else path.name] = path.read_text(encoding="utf-8")
    name = generator["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-{config_map_hash(data)}"},
        "data": data,
    }


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix: sha256 of the Go JSON encoding of kind, data and an empty name
    (kustomize hashes the map before naming it), its first 10 hex digits with 0, 1, 3, a, e
    replaced by letters."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )
    # Go's encoder escapes these for HTML safety; the hash is over Go's bytes.
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()
    return digest[:10].translate(_HASH_LETTERS)


def _apply_patch(directory: Path, patch: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    if set(patch) - {"path", "patch", "target"} or "target" not in patch:
        raise KustomizeError(f"patch entries need a target and a path or patch: {patch}")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizeError(f"{patch}: only JSON 6902 patches (lists of operations) work here")
    targets = [obj for obj in objects if _matches(obj, patch["target"])]
    if not targets:
        raise KustomizeError(f"patch target {patch['target']} matches no object")
    for obj in targets:
        for operation in operations:
            apply_operation(obj, operation)


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": obj["kind"],
              "name": obj["metadata"]["name"]}
    unknown = set(target) - set(actual)
    if unknown:
        raise KustomizeError(f"target selectors not supported: {sorted(unknown)}")
    return all(actual[key] == value for key, value in target.items())


def apply_operation(obj: Any, operation: dict[str, Any]) -> None:
    """Applies one JSON 6902 operation (add, remove, replace, test) to `obj` in place."""
    op, path = operation.get("op"), operation.get("path", "")
    if op not in ("add", "remove", "replace", "test"):
        raise KustomizeError(f"JSON 6902 op {op!r} is not supported")
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    if not tokens:
        raise KustomizeError(f"{op} at the document root is not supported")
    parent = obj
    for token in tokens[:-1]:
        parent = _child(parent, token, path)
    last = tokens[-1]
    if op == "test":
        if _child(parent, last, path) != operation.get("value"):
            raise KustomizeError(f"test failed at {path}: expected {operation.get('value')!r}")
    elif isinstance(parent, list):
        index = len(parent) if (op == "add" and last == "-") else _index(parent, last, path, op)
        if op == "remove":
            del parent[index]
        elif op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        else:
            parent[index] = copy.deepcopy(operation["value"])
    elif isinstance(parent, dict):
        if op != "add" and last not in parent:
            raise KustomizeError(f"{op} at {path}: no such member")
        if op == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(operation["value"])
    else:
        raise KustomizeError(f"{op} at {path}: the parent is not a container")


def _child(node: Any, token: str, path: str) -> Any:
    if isinstance(node, dict) and token in node:
        return node[token]
    if isinstance(node, list):
        return node[_index(node, token, path, "read")]
    raise KustomizeError(f"{path}: no member {token!r}")


def _index(items: list[Any], token: str, path: str, op: str) -> int:
    limit = len(items) + (1 if op == "add" else 0)
    if not token.isdigit() or int(token) >= limit:
        raise KustomizeError(f"{path}: index {token!r} out of range")
    return int(token)


def _add_labels(label_set: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
        raise KustomizeError("labels with includeSelectors/includeTemplates are not supported")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(label_set["pairs"])


def _set_image(node: Any, image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"image options not supported: {image}")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    container["image"] = _new_image(container.get("image", ""), image)
            else:
                _set_image(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, image)


def _new_image(current: str, image: dict[str, Any]) -> str:
    name, _, tag = current.partition(":")
    if name != image["name"]:
        return current
    new_tag = image.get("newTag", tag)
    return image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def _rename_config_map_refs(node: Any, renames: dict[str, str]) -> None:
    """Points pod-spec references (volumes, env, envFrom) at the hashed ConfigMap names."""
    if isinstance(node, dict):
        for key in ("configMap", "configMapKeyRef", "configMapRef"):
            ref = node.get(key)
            if isinstance(ref, dict) and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]
        for value in node.values():
            _rename_config_map_refs(value, renames)
    elif isinstance(node, list):
        for item in node:
            _rename_config_map_refs(item, renames)
