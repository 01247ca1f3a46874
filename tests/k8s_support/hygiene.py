"""Wiring checks across rendered objects that no single schema can see: every selector picks
some pod (or Service), and every named port it routes to exists."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, pod template) for each Deployment and each RayCluster head and worker group."""
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Deployment":
            yield name, obj["spec"]["template"]
        elif obj["kind"] == "RayCluster":
            yield f"{name} head", obj["spec"]["headGroupSpec"]["template"]
            for group in obj["spec"].get("workerGroupSpecs", []):
                yield f"{name} {group['groupName']}", group["template"]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def wiring_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every dangling selector or port reference among `objects`, one sentence each."""
    templates = list(pod_templates(objects))
    problems = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Deployment":
            selector = obj["spec"]["selector"]["matchLabels"]
            if not selects(selector, obj["spec"]["template"]["metadata"]["labels"]):
                problems.append(f"{name}: its selector does not match its own pod template")
        if obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"]["matchLabels"]
            if not any(selects(selector, t["metadata"].get("labels", {})) for _, t in templates):
                problems.append(f"{name}: selects no pod")
        if obj["kind"] == "Service":
            problems += _service_problems(name, obj, templates)
        if obj["kind"] == "ServiceMonitor":
            problems += _monitor_problems(name, obj, objects)
    return problems


def _service_problems(
    name: str, service: dict[str, Any], templates: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    selector = service["spec"].get("selector", {})
    picked = [t for _, t in templates if selects(selector, t["metadata"].get("labels", {}))]
    if not picked:
        return [f"{name}: selects no pod"]
    problems = []
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        for template in picked:
            ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
            if not any(target in (p.get("name"), p["containerPort"]) for p in ports):
                problems.append(f"{name}: port {port['name']} targets {target!r}, not on a pod")
    return problems


def _monitor_problems(
    name: str, monitor: dict[str, Any], objects: list[dict[str, Any]]
) -> list[str]:
    selector = monitor["spec"]["selector"].get("matchLabels", {})
    services = [
        obj for obj in objects
        if obj["kind"] == "Service" and selects(selector, obj["metadata"].get("labels", {}))
    ]
    if not services:
        return [f"{name}: selects no Service"]
    problems = []
    for endpoint in monitor["spec"]["endpoints"]:
        for service in services:
            if endpoint["port"] not in {port.get("name") for port in service["spec"]["ports"]}:
                problems.append(
                    f"{name}: Service {service['metadata']['name']} has no port {endpoint['port']}"
                )
    return problems
