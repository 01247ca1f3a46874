"""The golden test on a tiny random Llama through the whole system: router (gRPC on loopback)
-> prefill actor -> KV over gRPC -> decode actor -> streamed tokens, token for token equal to
`transformers` greedy `generate()`, alone and 8 at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, load_reports

PROMPTS = [
    [5, 17, 42, 99, 7, 3],
    [11, 12],
    [200, 150, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45],
    [64],
    list(range(100, 160)),
    [300, 301, 302],
    [9, 8, 7, 6, 5, 4, 3, 2],
    [250] * 20,
]
MAX_TOKENS = 16


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


def generate(address: str, prompt: list[int]):
    with GenerationClient(address, timeout_s=120) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0))


@pytest.fixture(scope="module")
def grpc_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    """Forces the cross-node transport on one node (the shared tiny service uses auto = shm)."""
    config = make_config(str(tiny_model_dir), kv_transfer={"transport": "grpc"})
    with Service(config) as running:
        yield running


@pytest.fixture(scope="module")
def nccl_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    """torch.distributed point-to-point; on CPU it runs (and reports) the gloo backend."""
    config = make_config(str(tiny_model_dir), kv_transfer={"transport": "nccl"})
    with Service(config) as running:
        yield running


SERVICE_BY_TRANSPORT = {"shm": "tiny_service", "grpc": "grpc_service", "gloo": "nccl_service"}


@pytest.mark.parametrize("transport", sorted(SERVICE_BY_TRANSPORT))
def test_each_request_alone_matches_transformers(
    transport: str, request: pytest.FixtureRequest, references
) -> None:
    service = request.getfixturevalue(SERVICE_BY_TRANSPORT[transport])
    for prompt, expected in zip(PROMPTS, references):
        result = generate(service.address, prompt)
        assert result.token_ids == expected, f"prompt {prompt}"
        assert result.final is not None
        assert result.final.usage.completion_tokens == len(expected)
        assert result.final.usage.prompt_tokens == len(prompt)
        assert result.final.served_by.kv_transport == transport
    assert_quiet(service)


def test_eight_concurrent_requests_match_and_share_decode_batches(
    tiny_service: Service, references
) -> None:
    before = {r.replica_id: r for r in load_reports(tiny_service)}
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: generate(tiny_service.address, p), PROMPTS))
    assert [r.token_ids for r in results] == references
    after = assert_quiet(tiny_service)
    decode_steps = sum(
        r.total_decode_steps - before[r.replica_id].total_decode_steps
        for r in after if r.role == "decode"
    )
    decode_tokens = sum(
        r.total_decode_tokens - before[r.replica_id].total_decode_tokens
        for r in after if r.role == "decode"
    )
    assert decode_tokens > decode_steps, "no decode step ran more than one sequence"


def test_kv_crosses_a_process_boundary_with_the_exact_byte_count(tiny_service: Service) -> None:
    reports = load_reports(tiny_service)
    pids = {r.role: r.pid for r in reports}
    assert pids["prefill"] != pids["decode"] and os.getpid() not in pids.values()
    received_before = sum(r.total_kv_bytes for r in reports if r.role == "decode")
    prompt = PROMPTS[4]
    result = generate(tiny_service.address, prompt)
    served = result.final.served_by
    # 3 layers x (K + V) x 60 tokens x 2 KV heads x 16 dims x 4 bytes (fp32)
    expected_bytes = 3 * 2 * len(prompt) * 2 * 16 * 4
    assert served.kv_bytes == expected_bytes
    assert served.kv_transport == "shm" and served.mode == "disaggregated"
    received_after = sum(r.total_kv_bytes for r in load_reports(tiny_service) if r.role == "decode")
    assert received_after - received_before == expected_bytes
    assert result.final.finish_reason in (
        pdserve_pb2.FINISH_REASON_LENGTH, pdserve_pb2.FINISH_REASON_STOP
    )
