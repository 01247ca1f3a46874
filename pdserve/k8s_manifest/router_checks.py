"""Do the router Deployment, its Services and the replicas' metrics ports match the config?

The router is the container whose command line runs `pdserve serve`. It must read the very
config it is checked against (from a mounted ConfigMap), join the RayCluster's head as a node
that offers nothing, listen where its Service and gRPC probes point, and bind its endpoints
to every interface; the worker pods must expose the replicas' fixed metrics port.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from pdserve.config import PdserveConfig, parse_config
from pdserve.errors import ConfigError

WILDCARD_HOSTS = ("0.0.0.0", "::")
RAY_GCS_PORT = 6379
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def check_router(config: PdserveConfig, objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every way the rendered objects disagree with `config` outside the RayCluster."""
    found = _router_container(objects)
    if found is None:
        return ["no Deployment runs `pdserve serve`"]
    deployment, container = found
    words = shlex.split(" ".join(container.get("command", []) + container.get("args", [])))
    env = {var["name"]: var.get("value") for var in container.get("env", [])}
    serve = _serve_words(words)
    problems = _check_config_source(
        config, deployment, container, _flag(serve, "--config"), objects
    )
    problems += _check_ray_join(config, objects, words, serve, env)
    problems += _check_listeners(config, container)
    problems += _check_router_service(config, deployment, container, objects)
    problems += _check_replica_metrics(config, objects)
    return problems


def _router_container(
    objects: Sequence[Mapping[str, Any]],
) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"].get("containers", []):
            command = " ".join(container.get("command", []) + container.get("args", []))
            if "pdserve serve" in command:
                return obj, container
    return None


def _serve_words(words: list[str]) -> list[str]:
    """The words of the script from `pdserve serve` on (its flags come after it)."""
    for i in range(len(words) - 1):
        if words[i].endswith("pdserve") and words[i + 1] == "serve":
            return words[i:]
    return []


def _flag(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _check_config_source(
    config: PdserveConfig, deployment: Mapping[str, Any], container: Mapping[str, Any],
    config_path: str | None, objects: Sequence[Mapping[str, Any]],
) -> list[str]:
    if config_path is None:
        return ["the router runs `pdserve serve` without --config"]
    folder, key = posixpath.split(config_path)
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    volume = volumes.get(mounts.get(folder, ""), {})
    map_name = (volume.get("configMap") or {}).get("name")
    if map_name is None:
        return [f"the router's --config {config_path} is not in a mounted ConfigMap"]
    mounted = mounted_config(objects, map_name, key)
    if mounted is None:
        return [f"ConfigMap {map_name} holds no valid pdserve config under {key!r}"]
    if mounted != config:
        return [f"ConfigMap {map_name}/{key} is not the config being checked"]
    return []


def _check_ray_join(
    config: PdserveConfig, objects: Sequence[Mapping[str, Any]], words: list[str],
    serve: list[str], env: Mapping[str, str | None],
) -> list[str]:
    problems = []
    names = [obj["metadata"]["name"] for obj in objects if obj.get("kind") == "RayCluster"]
    address = config.ray.address or ""
    host, _, port = address.rpartition(":")
    if not any(host.split(".")[0] == f"{name}-head-svc" for name in names):
        problems.append(
            f"ray.address {address!r} is not the head Service of the RayCluster "
            f"({', '.join(f'{name}-head-svc:{RAY_GCS_PORT}' for name in names) or 'none'})"
        )
    if port != str(RAY_GCS_PORT):
        problems.append(f"ray.address {address!r} does not name the GCS port {RAY_GCS_PORT}")
    flag = _flag(serve, "--ray-address")
    if flag is not None and _expand(flag, env) != address:
        problems.append(f"--ray-address {flag} is {_expand(flag, env)!r}, not ray.address")
    for needed in ("--num-cpus=0", "--num-gpus=0"):
        if needed not in words:
            problems.append(f"the router's `ray start` lacks {needed}: replicas could land there")
    return problems


def _expand(word: str, env: Mapping[str, str | None]) -> str | None:
    if word.startswith("$"):
        return env.get(word.strip("${}"))
    return word


def _check_listeners(config: PdserveConfig, container: Mapping[str, Any]) -> list[str]:
    problems = []
    ports = {port["containerPort"] for port in container.get("ports", [])}
    wanted = {"router.port": config.router.port}
    if config.router.http_port is not None:
        wanted["router.http_port"] = config.router.http_port
    if config.metrics.enabled:
        wanted["metrics.router_port"] = config.metrics.router_port
    problems += [
        f"the router container does not expose {key} {port}"
        for key, port in wanted.items() if port not in ports
    ]
    for probe in PROBES:
        grpc = (container.get(probe) or {}).get("grpc") or {}
        if grpc.get("port") != config.router.port:
            problems.append(f"the router's {probe} is not a gRPC probe of router.port")
    if config.security.tls_cert_file is not None:
        problems.append("security.tls_cert_file is set: Kubernetes gRPC probes cannot use TLS")
    hosts = {"router.host": config.router.host, "kv_transfer.host": config.kv_transfer.host}
    if config.metrics.enabled:
        hosts["metrics.host"] = config.metrics.host
    for key, host in hosts.items():
        expected = ("auto",) if key == "kv_transfer.host" else WILDCARD_HOSTS
        if host not in expected:
            problems.append(f"{key} is {host!r}: other pods need {' or '.join(expected)}")
    return problems


def _check_router_service(
    config: PdserveConfig, deployment: Mapping[str, Any], container: Mapping[str, Any],
    objects: Sequence[Mapping[str, Any]],
) -> list[str]:
    labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
    named = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    routed = set()
    for obj in objects:
        selector = (obj.get("spec") or {}).get("selector") or {}
        if obj.get("kind") != "Service" or not selector or not _selects(selector, labels):
            continue
        for port in obj["spec"].get("ports", []):
            target = port.get("targetPort", port.get("port"))
            routed.add(named.get(target, target))
    public = {"gRPC": config.router.port, "HTTP": config.router.http_port}
    return [
        f"no Service routes to the router's {api} port {port}"
        for api, port in public.items() if port is not None and port not in routed
    ]


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _check_replica_metrics(
    config: PdserveConfig, objects: Sequence[Mapping[str, Any]]
) -> list[str]:
    if not config.metrics.enabled:
        return []
    if config.metrics.replica_port == 0:
        return ["metrics.replica_port is 0 (a random port per replica): set a fixed port"]
    problems = []
    for obj in objects:
        if obj.get("kind") != "RayCluster":
            continue
        for group in obj["spec"].get("workerGroupSpecs", []):
            container = group["template"]["spec"]["containers"][0]
            ports = {port["containerPort"] for port in container.get("ports", [])}
            if config.metrics.replica_port not in ports:
                problems.append(
                    f"worker group {group['groupName']} does not expose metrics.replica_port "
                    f"{config.metrics.replica_port}"
                )
    return problems


def mounted_config(
    objects: Sequence[Mapping[str, Any]], map_name: str, key: str
) -> PdserveConfig | None:
    """The config stored under `key` of ConfigMap `map_name` among `objects`, or None."""
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == map_name:
            text = (obj.get("data") or {}).get(key)
            if text is None:
                return None
            try:
                return parse_config(yaml.safe_load(text), origin=f"ConfigMap {map_name}/{key}")
            except (ConfigError, yaml.YAMLError):
                return None
    return None
