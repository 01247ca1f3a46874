"""pdserve on a genuine multi-node Ray cluster on this machine, run in a process of its own.

A head node plus a "prefill" node and a "decode" node (each its own raylet, so its own Ray node
id), each offering its own custom resource and `pdserve/role` label. A process joins at most one
Ray cluster and the integration session already has one, so `test_multinode.py` runs this as
`python -m tests.integration.multinode_scenario` with a JSON spec on stdin
({"model_dir", "prompts", "max_tokens"}) and reads one line `RESULT_MARKER + json` from stdout.
It only observes and reports; the test asserts. It imports neither torch nor the integration
conftest (which does): on a busy 2-core machine that import alone takes many seconds.

The parent sets RAY_TMPDIR to a private folder (the cluster's address file then cannot send
another process's `ray.init()` here) and RAY_AUTH_MODE=token with RAY_AUTH_TOKEN (token
authentication stays on for every node, the driver and the workers).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pdserve.client import GenerationClient, collect
from pdserve.config import PdserveConfig, ResourcesConfig
from pdserve.errors import PdserveError
from pdserve.messages import LoadReport, decode
from pdserve.placement import actor_options
from pdserve.serve import Service
from tests.factories.config import make_config

RESULT_MARKER = "PDSERVE_MULTINODE_RESULT "
ROLE_LABEL = "pdserve/role"
# Units of each role's custom resource on its node; CPUs per node.
NODE_RESOURCE_UNITS = 4
NODE_CPUS = 2
PROBE_TIMEOUT_S = 60.0
QUIET_TIMEOUT_S = 30.0


def main() -> None:
    spec = json.loads(sys.stdin.read())
    cluster = _start_cluster()
    try:
        ray.init(
            address=cluster.address, namespace="pdserve-multinode", logging_level=logging.WARNING
        )
        result: dict[str, Any] = {"token_auth": _token_auth_on(), "nodes": _node_roles()}
        result["unplaceable"] = {
            name: _try_start(config) for name, config in _unplaceable_configs(spec).items()
        }
        result["probes"] = _probe_placements()
        result["served"] = _serve(spec)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(RESULT_MARKER + json.dumps(result), flush=True)


def _start_cluster() -> Cluster:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    for role in ("prefill", "decode"):
        cluster.add_node(
            wait=False,
            num_cpus=NODE_CPUS,
            resources={f"pdserve_{role}": NODE_RESOURCE_UNITS},
            labels={ROLE_LABEL: role},
        )
    cluster.wait_for_nodes(timeout=120)
    return cluster


def _token_auth_on() -> bool:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return bool(get_authentication_mode() == AuthenticationMode.TOKEN)


def _node_roles() -> dict[str, str]:
    """{node id: its role label, or "head"} of the alive nodes."""
    return {
        node["NodeID"]: node["Labels"].get(ROLE_LABEL, "head")
        for node in ray.nodes()
        if node["Alive"]
    }


def _placed(role: str) -> dict[str, Any]:
    resources = {"custom_resources": {f"pdserve_{role}": 1}, "node_labels": {ROLE_LABEL: role}}
    return {"resources": resources}


def _serving_config(spec: dict[str, Any], **overrides: Any) -> PdserveConfig:
    base: dict[str, Any] = {
        "prefill": _placed("prefill"),
        "decode": _placed("decode"),
        "kv_transfer": {"transport": "auto"},
    }
    return make_config(spec["model_dir"], **{**base, **overrides})


def _unplaceable_configs(spec: dict[str, Any]) -> dict[str, PdserveConfig]:
    prefill_needs = _placed("prefill")["resources"]
    decode_needs = _placed("decode")["resources"]
    return {
        "missing_resource": _serving_config(
            spec, prefill={"resources": {**prefill_needs, "custom_resources": {"pdserve_gpu": 1}}}
        ),
        "missing_label": _serving_config(
            spec, decode={"resources": {**decode_needs, "node_labels": {ROLE_LABEL: "gpu"}}}
        ),
        # Each requirement exists somewhere, but never together on one node.
        "no_single_node": _serving_config(
            spec, prefill={"resources": {**prefill_needs, "node_labels": {ROLE_LABEL: "decode"}}}
        ),
        # The decode node's CPUs hold NODE_CPUS replicas of 1 CPU, not one more.
        "too_many_replicas": _serving_config(
            spec, decode={**_placed("decode"), "replicas": NODE_CPUS + 1}
        ),
    }


def _try_start(config: PdserveConfig) -> dict[str, Any]:
    started = time.monotonic()
    service = Service(config)
    try:
        service.start()
    except PdserveError as exc:
        return {
            "error_type": type(exc).__name__,
            "message": exc.message,
            "elapsed_s": time.monotonic() - started,
        }
    finally:
        service.stop()
    return {"error_type": None, "message": "", "elapsed_s": time.monotonic() - started}


@ray.remote
class _Where:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _probe_placements() -> dict[str, str]:
    """Where an actor with only one of the knobs set lands (no CPUs asked: only the knob
    steers it away from the head node, where the driver runs)."""
    probes = {
        "labels_only": ResourcesConfig(num_cpus=0, node_labels={ROLE_LABEL: "decode"}),
        "resources_only": ResourcesConfig(num_cpus=0, custom_resources={"pdserve_prefill": 1}),
        "negated_label": ResourcesConfig(
            num_cpus=0, node_labels={ROLE_LABEL: "!in(prefill,decode)"}
        ),
    }
    placed = {}
    for name, resources in probes.items():
        actor = _Where.options(**actor_options(resources)).remote()
        try:
            placed[name] = ray.get(actor.node_id.remote(), timeout=PROBE_TIMEOUT_S)
        finally:
            ray.kill(actor)
    return placed


def _serve(spec: dict[str, Any]) -> dict[str, Any]:
    with Service(_serving_config(spec)) as service:
        # Where Ray's actor table (GCS) says each replica runs, beside what it reports itself.
        actor_nodes = {
            replica_id: ray._private.state.actors(actor_id=actor._actor_id.hex())["Address"][
                "NodeID"
            ]
            for replica_id, actor in {**service.prefill_actors, **service.decode_actors}.items()
        }
        replicas = [
            {"replica_id": r.replica_id, "role": r.role, "node_id": r.node_id}
            for r in _load_reports(service)
        ]
        requests = [
            _generate(service.address, prompt, spec["max_tokens"]) for prompt in spec["prompts"]
        ]
        leaks = _leaks_once_quiet(service)
    return {"replicas": replicas, "actor_nodes": actor_nodes, "requests": requests, "leaks": leaks}


def _load_reports(service: Service) -> list[LoadReport]:
    actors = {**service.prefill_actors, **service.decode_actors}.values()
    return [decode(LoadReport, ray.get(actor.load.remote(), timeout=30)) for actor in actors]


def _leaks_once_quiet(service: Service) -> str:
    """The leak oracle of the integration conftest: "" once no lease, block, transfer or router
    entry is left; else what was still held at the deadline. Polls (bounded): releases reach
    replicas asynchronously."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        leaks = [
            report for report in _load_reports(service)
            if report.num_active_requests or report.num_leases or report.num_transfers
            or report.num_free_blocks != report.num_total_blocks
        ]
        inflight = service.router.front_door.num_inflight if service.router is not None else 0
        if not leaks and not inflight:
            return ""
        if time.monotonic() > deadline:
            return f"leaks={leaks} router_inflight={inflight}"
        time.sleep(0.05)  # polling interval of a bounded wait, not synchronisation


def _generate(address: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    with GenerationClient(address, timeout_s=120) as client:
        result = collect(client.generate(prompt, max_tokens=max_tokens, temperature=0.0))
    served = result.final.served_by if result.final is not None else None
    return {
        "token_ids": list(result.token_ids),
        "mode": served.mode if served else "",
        "kv_transport": served.kv_transport if served else "",
        "prefill_replica": served.prefill_replica if served else "",
        "decode_replica": served.decode_replica if served else "",
    }


if __name__ == "__main__":
    main()
