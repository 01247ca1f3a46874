"""A burst an ordinary chat application sends, on the default config (`configs/local.yaml`:
SmolLM2 fp32, 1 prefill + 1 decode replica, a 512 MiB decode cache): 64 concurrent chats, each
asking for up to 1,000 tokens and stopping on its own. With worst-case reservation most of them
were refused; now every one completes, greedy and token-identical to `transformers`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.embedded import resolve_model_source
from pdserve.client import GenerationClient, GenerationResult, collect
from pdserve.config import EMBEDDED_MODEL, load_config
from pdserve.serve import Service
from tests.integration.conftest import assert_quiet

pytestmark = pytest.mark.smollm2

QUESTIONS = [
    "What is 2 + 2?",
    "Name the capital of Italy.",
    "Is the sun a star? Answer yes or no.",
    "Translate 'cat' into French.",
    "What is the opposite of hot?",
    "What colour is the sky on a clear day?",
    "What is the capital of France?",
    "Name a primary colour.",
]
COPIES = 8  # 64 requests in all
MAX_TOKENS = 1000


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def references() -> list[list[int]]:
    model_dir = resolve_model_source(EMBEDDED_MODEL, None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for question in QUESTIONS:
        input_ids = tokenizer.apply_chat_template(
            chat(question), add_generation_prompt=True, return_tensors="pt"
        )["input_ids"]
        out = model.generate(input_ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(out[0, input_ids.shape[1]:].tolist())
    return outputs


@pytest.fixture(scope="module")
def default_service(ray_cluster: None) -> Iterator[Service]:
    config = load_config("configs/local.yaml")
    # Only what a test run must change: free ports (other services run in this session).
    ports: dict[str, Any] = {
        "router": config.router.model_copy(update={"port": 0, "http_port": 0}),
        "metrics": config.metrics.model_copy(update={"router_port": 0}),
    }
    with Service(config.model_copy(update=ports)) as running:
        yield running


def ask(address: str, question: str) -> GenerationResult:
    with GenerationClient(address, timeout_s=600) as client:
        return collect(client.generate(chat(question), max_tokens=MAX_TOKENS))


def test_sixty_four_concurrent_chats_all_complete_exactly(
    default_service: Service, references: list[list[int]]
) -> None:
    questions = QUESTIONS * COPIES
    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        results = list(pool.map(lambda q: ask(default_service.address, q), questions))
    assert [r.token_ids for r in results] == references * COPIES
    assert all(r.final is not None for r in results)
    assert_quiet(default_service)
