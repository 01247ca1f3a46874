"""Ways to break the rendered manifests or the config, each with the message the check that
must catch it reports (tests/unit/test_k8s_manifests.py applies every one)."""

from __future__ import annotations

from typing import Any

from tests.k8s_support.overlays import find


def worker(objects: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
    return find(objects, "RayCluster")["spec"]["workerGroupSpecs"][index]


def head(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "RayCluster")["spec"]["headGroupSpec"]


def router(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


SCHEMA_BREAKS = {
    "unknown worker group field": (
        lambda o: worker(o).update(replica=2), "'replica' was unexpected"),
    "non-string rayStartParams value": (
        lambda o: worker(o)["rayStartParams"].update({"num-cpus": 2}), "is not of type 'string'"),
    "negative replicas": (lambda o: worker(o).update(replicas=-1), "less than the minimum"),
    "worker group without a name": (
        lambda o: worker(o).pop("groupName"), "'groupName' is a required property"),
    "bad field in a worker pod template": (
        lambda o: worker(o)["template"]["spec"]["containers"][0].update(resource={}),
        "'resource' was unexpected"),
    "bad gRPC probe port": (
        lambda o: router(o)["readinessProbe"]["grpc"].update(port="grpc"), "is not of type"),
    "unknown Deployment field": (
        lambda o: find(o, "Deployment")["spec"].update(replica=1), "'replica' was unexpected"),
    "Service port without a port number": (
        lambda o: find(o, "Service", "pdserve-router")["spec"]["ports"][0].pop("port"),
        "'port' is a required property"),
    "ServiceMonitor without endpoints": (
        lambda o: find(o, "ServiceMonitor")["spec"].update(endpoints=[]), "should be non-empty"),
    "ServiceMonitor interval not a duration": (
        lambda o: find(o, "ServiceMonitor")["spec"]["endpoints"][0].update(interval="15 sec"),
        "does not match"),
}


def with_sections(config: Any, **sections: dict[str, Any]) -> Any:
    """`config` with some sections' fields replaced (pools' `resources` by a dict too)."""
    updates = {}
    for name, fields in sections.items():
        section = getattr(config, name)
        if "resources" in fields:
            fields = {**fields, "resources": section.resources.model_copy(
                update=fields["resources"])}
        updates[name] = section.model_copy(update=fields)
    return config.model_copy(update=updates)


CONFIG_DRIFTS = {
    "more prefill replicas than pods": (
        {"prefill": {"replicas": 3}}, "worker group prefill: replicas is 1"),
    "a GPU the pods lack": (
        {"decode": {"resources": {"num_gpus": 1.0}}}, "cannot host"),
    "decode not pinned to its pods": (
        {"decode": {"resources": {"custom_resources": {}}}},
        "decode replicas could be placed on a prefill pod"),
    "router bound to loopback": (
        {"router": {"host": "127.0.0.1"}}, "router.host is '127.0.0.1'"),
    "KV server bound to loopback": (
        {"kv_transfer": {"host": "127.0.0.1"}}, "kv_transfer.host"),
    "random replica metrics port": (
        {"metrics": {"replica_port": 0}}, "metrics.replica_port is 0"),
    "ray address elsewhere": (
        {"ray": {"address": "ray-head:6379"}}, "is not the head Service"),
    "HTTP API on a port the pod does not expose": (
        {"router": {"http_port": 8080}}, "does not expose router.http_port 8080"),
}


MANIFEST_DRIFTS = {
    "two replicas fit one pod": (
        lambda o: worker(o).update(
            resources={"pdserve_prefill": "2"}, rayStartParams={"num-cpus": "4"}),
        "would collide"),
    "head offers what a prefill replica needs": (
        lambda o: head(o).update(
            rayStartParams={"num-cpus": "2"}, resources={"pdserve_prefill": "1"}),
        "prefill replicas could be placed on the Ray head"),
    "router node offers CPUs": (
        lambda o: router(o).update(args=[router(o)["args"][0].replace("--num-cpus=0", "")]),
        "lacks --num-cpus=0"),
    "liveness probe on the metrics port": (
        lambda o: router(o)["livenessProbe"]["grpc"].update(port=9400), "livenessProbe"),
    "worker without the metrics port": (
        lambda o: worker(o, 1)["template"]["spec"]["containers"][0].update(ports=[]),
        "worker group decode does not expose metrics.replica_port"),
    "no Service for the HTTP API": (
        lambda o: find(o, "Service", "pdserve-router")["spec"].update(ports=[
            p for p in find(o, "Service", "pdserve-router")["spec"]["ports"]
            if p["name"] != "http"]),
        "no Service routes to the router's HTTP port 8000"),
    "router reads another file": (
        lambda o: router(o).update(args=[router(o)["args"][0].replace(
            "/etc/pdserve/config.yaml", "/etc/pdserve/other.yaml")]),
        "holds no valid pdserve config under 'other.yaml'"),
}
