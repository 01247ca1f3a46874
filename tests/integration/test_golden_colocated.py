"""The golden test in `mode: colocated`: router (gRPC on loopback) -> colocated replicas that
prefill in chunks beside running decode tokens -> streamed tokens, token for token equal to
`transformers` greedy `generate()`, alone and 8 at a time. Every prompt is longer than the
per-step prefill budget, so chunked prefill really happens (the replicas count the chunks)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.colocated_oracle import assert_colocated_quiet, colocated_reports, totals

BUDGET = 8
PROMPTS = [
    [5, 17, 42, 99, 7, 3, 11, 12, 13],
    [200, 150, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45],
    list(range(100, 160)),
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311],
    [9, 8, 7, 6, 5, 4, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [250] * 20,
    list(range(40, 73)),
    [64, 65] * 12 + [66],
]
MAX_TOKENS = 16
# The reference's generate() masks pad tokens out of its input: no prompt may contain one.
PAD_TOKEN_ID = 1


@pytest.fixture(scope="module")
def references(tiny_model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    outputs = []
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module")
def colocated_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    """2 colocated replicas (the same cores as 1 prefill + 1 decode) in the shared cluster."""
    config = make_config(
        str(tiny_model_dir), mode="colocated",
        colocated={
            "replicas": 2, "resources": {"num_cpus": 1}, "kv_cache": {"memory_mb": 64},
            "max_prefill_tokens_per_step": BUDGET,
        },
    )
    with Service(config) as running:
        yield running


def generate(address: str, prompt: list[int]):
    with GenerationClient(address, timeout_s=120) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0))


def test_every_prompt_is_longer_than_the_budget_and_has_no_pad() -> None:
    assert all(len(prompt) > BUDGET and PAD_TOKEN_ID not in prompt for prompt in PROMPTS)


def test_each_request_alone_matches_transformers(colocated_service: Service, references) -> None:
    for prompt, expected in zip(PROMPTS, references):
        before = totals(colocated_reports(colocated_service))
        result = generate(colocated_service.address, prompt)
        assert result.token_ids == expected, f"prompt {prompt}"
        final = result.final
        assert final is not None
        assert final.usage.completion_tokens == len(expected)
        assert final.usage.prompt_tokens == len(prompt)
        served = final.served_by
        assert (served.mode, served.kv_transport, served.kv_bytes) == ("colocated", "none", 0)
        assert served.prefill_replica == served.decode_replica
        assert served.prefill_replica.startswith("colocated-")
        after = totals(assert_colocated_quiet(colocated_service))
        # Alone, a prompt has the whole budget of every step: ceil(len / budget) chunks.
        assert after["prefill_chunks"] - before["prefill_chunks"] == -(-len(prompt) // BUDGET)


def test_eight_concurrent_requests_match_with_chunked_mixed_steps(
    colocated_service: Service, references
) -> None:
    before = totals(colocated_reports(colocated_service))
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: generate(colocated_service.address, p), PROMPTS))
    assert [r.token_ids for r in results] == references
    assert {r.final.served_by.mode for r in results} == {"colocated"}
    after = totals(assert_colocated_quiet(colocated_service))
    delta = {key: after[key] - before[key] for key in after}
    assert delta["requests"] == len(PROMPTS)
    assert delta["prefill_chunks"] >= sum(-(-len(p) // BUDGET) for p in PROMPTS), "no chunking"
    assert delta["mixed_steps"] > 0, "no step carried decode tokens and prompt chunks together"
    # One sequence per step would make steps == decode tokens + prompt chunks.
    assert delta["steps"] < delta["decode_tokens"] + delta["prefill_chunks"], "no batching"
