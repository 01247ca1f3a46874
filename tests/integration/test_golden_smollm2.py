"""The golden test on the real embedded model (SmolLM2-135M-Instruct, fp32): greedy output
through router -> prefill -> KV over gRPC -> decode equals `transformers` `generate()`, alone
and 8 at a time; and `pdserve generate` prints the same continuation. Prefill chunks are
`CHUNK_TOKENS` long, so every prompt is prefilled over several packed passes (chunked prefill;
tests/unit/prefill_decode/test_prefill_chunking.py checks the passes themselves)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.embedded import resolve_model_source
from pdserve import cli
from pdserve.client import GenerationClient, collect
from pdserve.config import EMBEDDED_MODEL
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet

pytestmark = pytest.mark.smollm2

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite food is pizza because",
    "Translate to French: good morning ->",
    "The largest planet in the solar system is",
]
MAX_TOKENS = 16
CHUNK_TOKENS = 4


@pytest.fixture(scope="module")
def model_dir() -> str:
    return resolve_model_source(EMBEDDED_MODEL, None)


@pytest.fixture(scope="module")
def references(model_dir: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(input_ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(out[0, input_ids.shape[1]:].tolist())
    return outputs


@pytest.fixture(scope="module")
def smollm2_service(ray_cluster: None, model_dir: str) -> Iterator[Service]:
    config = make_config(
        EMBEDDED_MODEL,
        prefill={"max_chunk_tokens": CHUNK_TOKENS},
        decode={"kv_cache": {"memory_mb": 128}},
    )
    with Service(config) as running:
        yield running


def generate(address: str, prompt: str):
    with GenerationClient(address, timeout_s=300) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0))


def test_each_prompt_alone_matches_transformers(
    smollm2_service: Service, references, model_dir: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert all(len(tokenizer(p).input_ids) > CHUNK_TOKENS for p in PROMPTS), "no chunking"
    for prompt, expected in zip(PROMPTS, references):
        result = generate(smollm2_service.address, prompt)
        assert result.token_ids == expected, prompt
    assert_quiet(smollm2_service)


def test_eight_concurrent_prompts_match_transformers(smollm2_service: Service, references) -> None:
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: generate(smollm2_service.address, p), PROMPTS))
    assert [r.token_ids for r in results] == references
    assert_quiet(smollm2_service)


def test_cli_generate_prints_the_transformers_continuation(
    smollm2_service: Service, references, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code = cli.main([
        "generate", "--address", smollm2_service.address, "--temperature", "0",
        "--max-tokens", str(MAX_TOKENS), PROMPTS[0],
    ])
    assert exit_code == 0
    expected_text = AutoTokenizer.from_pretrained(model_dir).decode(
        references[0], skip_special_tokens=True
    )
    assert capsys.readouterr().out.rstrip("\n") == expected_text.rstrip("\n")
