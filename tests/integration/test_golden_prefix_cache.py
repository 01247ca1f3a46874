"""The golden test with prefix-cache hits: prompts sharing a system prompt, with different user
suffixes, through the whole system (router -> prefill actor -> KV hand-off -> decode actor),
run one after the other and all at once, equal `transformers` greedy `generate()` token for
token, and the prefill replica's load report shows the shared blocks were reused, not
recomputed."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.integration.conftest import assert_quiet, load_reports

MAX_TOKENS = 12
SUFFIXES = [[11, 12, 13], [40], [90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103],
            [250, 7], [33, 33, 33, 33, 33], [301]]


def system_prompt(seed: int, num_tokens: int = 100) -> list[int]:
    return [(seed + 13 * i) % 290 + 5 for i in range(num_tokens)]


Reference = Callable[[list[int]], list[int]]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    def generate(prompt: list[int]) -> list[int]:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=1
        )
        return out[0, len(prompt):].tolist()

    return generate


def generate(address: str, prompt: list[int]) -> list[int]:
    with GenerationClient(address, timeout_s=120) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0)).token_ids


def cached_prompt_tokens(service: Service) -> int:
    return sum(r.total_cached_prompt_tokens for r in load_reports(service) if r.role == "prefill")


def shared_tokens(service: Service, system: list[int]) -> int:
    """Tokens of `system` a later prompt reuses: its full blocks (every suffix differs from
    the others in its first token, so no block past the system prompt is shared)."""
    block_size = service.config.prefill.kv_cache.block_size
    return len(system) // block_size * block_size


def test_sequential_requests_with_a_shared_system_prompt_match(
    tiny_service: Service, reference: Reference
) -> None:
    assert tiny_service.config.prefill.prefix_caching
    assert len(tiny_service.prefill_actors) == 1, "every hit lands on the one prefill replica"
    system = system_prompt(seed=1)
    before = cached_prompt_tokens(tiny_service)
    for suffix in SUFFIXES:
        prompt = system + suffix
        assert generate(tiny_service.address, prompt) == reference(prompt), f"suffix {suffix}"
    hits = cached_prompt_tokens(tiny_service) - before
    assert hits == (len(SUFFIXES) - 1) * shared_tokens(tiny_service, system)
    reports = assert_quiet(tiny_service)
    assert any(r.num_cached_blocks > 0 for r in reports if r.role == "prefill")


def test_concurrent_requests_with_a_shared_system_prompt_match(
    tiny_service: Service, reference: Reference
) -> None:
    system = system_prompt(seed=2)  # not cached yet: the requests race to compute it
    prompts = [system + suffix for suffix in SUFFIXES]
    before = cached_prompt_tokens(tiny_service)
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outputs = list(pool.map(lambda p: generate(tiny_service.address, p), prompts))
    assert outputs == [reference(prompt) for prompt in prompts]
    # The prefill replica computes the shared blocks once, whatever the batching.
    hits = cached_prompt_tokens(tiny_service) - before
    assert hits == (len(SUFFIXES) - 1) * shared_tokens(tiny_service, system)
    assert_quiet(tiny_service)
