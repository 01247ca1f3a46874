"""Placement on a genuine multi-node Ray cluster: a head node plus a "prefill" and a "decode"
node (separate raylets on this machine) with their own custom resources and labels. The prefill
and decode pools land on their nodes, KV crosses nodes over gRPC (`transport: auto`), output
equals `transformers` greedy `generate()`, and a pool no node can host fails `serve` at once.

The cluster runs in a subprocess (`multinode_scenario.py`): this process may already belong to
the session's single-node cluster, and a process joins one Ray cluster at most.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integration.multinode_scenario import RESULT_MARKER

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 42, 99, 7, 3], [200, 150, 30, 31, 32, 33, 34, 35], list(range(100, 140))]
MAX_TOKENS = 12
# Three raylets, two replicas and a few pool starts; generous for a loaded 2-core machine.
SCENARIO_TIMEOUT_S = 300
# Far below the replica start timeout (900 s): the check runs before any actor is created.
FAIL_FAST_S = 10.0


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    outputs = []
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=1
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module")
def scenario(tiny_model_dir: Path) -> dict[str, Any]:
    spec = {"model_dir": str(tiny_model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS}
    # Short and private: Ray's socket paths live under it (Unix sockets allow ~107 bytes), and
    # the cluster's address file there never redirects another process's `ray.init()`.
    ray_tmp = tempfile.mkdtemp(prefix="pdmn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.multinode_scenario"],
        cwd=REPO, env=env, text=True, start_new_session=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = process.communicate(json.dumps(spec), timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The scenario's own session: its raylets and workers go with it.
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"multi-node scenario timed out after {SCENARIO_TIMEOUT_S} s:\n{err[-4000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = [line for line in out.splitlines() if line.startswith(RESULT_MARKER)]
    if process.returncode != 0 or not results:
        pytest.fail(f"multi-node scenario failed (exit {process.returncode}):\n{err[-4000:]}")
    return json.loads(results[-1][len(RESULT_MARKER):])


def test_cluster_has_three_nodes_with_token_auth(scenario: dict[str, Any]) -> None:
    assert sorted(scenario["nodes"].values()) == ["decode", "head", "prefill"]
    assert scenario["token_auth"] is True


def test_each_pool_runs_on_the_node_it_asks_for(scenario: dict[str, Any]) -> None:
    roles = scenario["nodes"]
    replicas = scenario["served"]["replicas"]
    assert sorted(r["replica_id"] for r in replicas) == ["decode-0", "prefill-0"]
    for replica in replicas:
        # What the replica reports (LoadReport.node_id) and what Ray's actor table says agree.
        assert replica["node_id"] == scenario["served"]["actor_nodes"][replica["replica_id"]]
        assert roles[replica["node_id"]] == replica["role"]


def test_kv_crosses_nodes_over_grpc_and_output_matches_transformers(
    scenario: dict[str, Any], references: list[list[int]]
) -> None:
    requests = scenario["served"]["requests"]
    assert [r["token_ids"] for r in requests] == references
    for request in requests:
        assert request["mode"] == "disaggregated"
        assert request["kv_transport"] == "grpc"
        assert (request["prefill_replica"], request["decode_replica"]) == ("prefill-0", "decode-0")
    assert scenario["served"]["leaks"] == ""


def test_each_knob_alone_steers_placement(scenario: dict[str, Any]) -> None:
    roles = scenario["nodes"]
    probes = scenario["probes"]
    assert roles[probes["labels_only"]] == "decode"
    assert roles[probes["resources_only"]] == "prefill"
    assert roles[probes["negated_label"]] == "head"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_resource", ["prefill pool", "'pdserve_gpu'", "no node offers any"]),
        ("missing_label", ["decode pool", "pdserve/role", "'gpu'", "decode, prefill"]),
        ("no_single_node", ["prefill pool", "no single node", "pdserve/role=decode"]),
        ("too_many_replicas", ["decode pool", "3 replicas", "at most 2"]),
    ],
)
def test_an_unplaceable_pool_fails_fast_naming_what_is_missing(
    scenario: dict[str, Any], case: str, expected: list[str]
) -> None:
    outcome = scenario["unplaceable"][case]
    assert outcome["error_type"] == "Unavailable"
    for text in expected:
        assert text in outcome["message"]
    assert outcome["elapsed_s"] < FAIL_FAST_S
