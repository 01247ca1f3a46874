"""Fixtures of the PrefillWorker + DecodeWorker tests: the tiny model, transformers' greedy
reference, and worker pairs (layer-pipelined and after-pass sends) with and without prefix
caching and with small prefill chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.factories.model import build_tiny_model_dir
from tests.factories.prefill_pair import Pair, build_pair

# Prefill chunk of the `chunked_pair`: a 21-token prompt takes 3 passes.
CHUNK_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Callable[[list[int], int], list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def generate(prompt: list[int], num_new_tokens: int) -> list[int]:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=num_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[0, len(prompt) :].tolist()

    return generate



@pytest.fixture(params=[True, False], ids=["pipelined", "after-pass"])
async def pair(model_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async for built in build_pair(model_dir, request.param, prefix_caching=True):
        yield built


@pytest.fixture(params=[True, False], ids=["pipelined", "after-pass"])
async def uncached_pair(model_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async for built in build_pair(model_dir, request.param, prefix_caching=False):
        yield built


@pytest.fixture(params=[True, False], ids=["pipelined", "after-pass"])
async def chunked_pair(model_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async for built in build_pair(
        model_dir, request.param, prefix_caching=True, max_chunk_tokens=CHUNK_TOKENS
    ):
        yield built
