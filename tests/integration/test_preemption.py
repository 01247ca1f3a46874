"""Decode KV that grows with each sequence, and preemption by recompute, on a real service.

A decode cache of a few dozen blocks and 8 requests that outgrow it together: every request
completes, token-identical to `transformers` greedy `generate()` (EOS ignored on both sides),
some were preempted (counted per request and by the replicas), and the leak oracle is clean, in
both modes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.client import GenerationClient, GenerationResult, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.colocated_oracle import assert_colocated_quiet
from tests.integration.conftest import assert_quiet, load_reports

# 8 prompts of 4-23 tokens; with 200 new tokens each a sequence ends on 13-14 blocks of 16:
# ~110 blocks together, while 1 MiB of tiny-model KV holds 85.
PROMPTS = [[3 + i, *range(10 + 7 * i, 13 + 9 * i)] for i in range(8)]
MAX_TOKENS = 200
LIMITS = {"max_tokens": 256}
SMALL_CACHE = {"memory_mb": 1, "block_size": 16}


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    outputs = []
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
            pad_token_id=1, eos_token_id=None,
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module")
def disaggregated(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    config = make_config(
        str(tiny_model_dir), decode={"kv_cache": SMALL_CACHE}, limits=LIMITS,
        reliability={"max_preemptions": 50},
    )
    with Service(config) as running:
        yield running


@pytest.fixture(scope="module")
def colocated(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    config = make_config(
        str(tiny_model_dir), mode="colocated", limits=LIMITS,
        colocated={"replicas": 1, "kv_cache": SMALL_CACHE},
        reliability={"max_preemptions": 50},
    )
    with Service(config) as running:
        yield running


def generate(address: str, prompt: list[int]) -> GenerationResult:
    with GenerationClient(address, timeout_s=300) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True))


def run_all(service: Service) -> list[GenerationResult]:
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        return list(pool.map(lambda p: generate(service.address, p), PROMPTS))


def replica_preemptions(service: Service) -> int:
    return sum(r.total_preemptions for r in load_reports(service))


def test_outgrowing_the_decode_cache_preempts_and_stays_exact(
    disaggregated: Service, references: list[list[int]]
) -> None:
    before = replica_preemptions(disaggregated)
    results = run_all(disaggregated)
    assert [r.token_ids for r in results] == references
    per_request = [r.final.served_by.num_preemptions for r in results if r.final is not None]
    assert len(per_request) == len(PROMPTS)
    assert sum(per_request) > 0
    assert replica_preemptions(disaggregated) - before == sum(per_request)
    assert_quiet(disaggregated)


def test_outgrowing_a_colocated_cache_preempts_and_stays_exact(
    colocated: Service, references: list[list[int]]
) -> None:
    before = replica_preemptions(colocated)
    results = run_all(colocated)
    assert [r.token_ids for r in results] == references
    per_request = [r.final.served_by.num_preemptions for r in results if r.final is not None]
    assert sum(per_request) > 0
    assert replica_preemptions(colocated) - before == sum(per_request)
    assert_colocated_quiet(colocated)
