"""The engine alone (no Ray, no gRPC): packed prefill + paged batched decode reproduce
`transformers`' greedy `generate()` token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.block_manager import BlockManager
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.model_loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, SequenceChunk
from engine.sampler import sample
from pdserve.config import ModelConfig
from pdserve.messages import SamplingParams
from tests.factories.model import build_tiny_model_dir

PROMPTS = [[5, 17, 42, 99, 7, 3], [11, 12], [200, 150, 30, 31, 32, 33, 34, 35, 36, 37, 38], [64]]
NUM_NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def reference(path: Path, prompt: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def make_runner(loaded: LoadedModel, block_size: int = 4) -> tuple[ModelRunner, BlockManager]:
    spec = KVCacheSpec(
        num_layers=loaded.num_layers, num_kv_heads=loaded.num_kv_heads, head_dim=loaded.head_dim,
        dtype=loaded.dtype, block_size=block_size, num_blocks=64,
    )
    return ModelRunner(loaded, PagedKVCache(spec)), BlockManager(64, block_size)


def generate_batched(runner: ModelRunner, blocks: BlockManager, prompts: list[list[int]]):
    tables = [blocks.allocate(str(i), len(p) + NUM_NEW_TOKENS) for i, p in enumerate(prompts)]
    chunks = [SequenceChunk(p, 0, t) for p, t in zip(prompts, tables)]
    outputs = [[t] for t in sample(runner.forward(chunks), [GREEDY] * len(prompts), [0] * 4)]
    for step in range(1, NUM_NEW_TOKENS):
        chunks = [
            SequenceChunk([out[-1]], len(p) + step - 1, t)
            for p, out, t in zip(prompts, outputs, tables)
        ]
        for out, token in zip(outputs, sample(runner.forward(chunks), [GREEDY] * 4, [step] * 4)):
            out.append(token)
    return outputs


def test_packed_prefill_and_batched_decode_match_generate(tiny_model: Path) -> None:
    loaded = load_model(ModelConfig(source=str(tiny_model), dtype="float32"))
    runner, blocks = make_runner(loaded)
    outputs = generate_batched(runner, blocks, PROMPTS)
    assert outputs == [reference(tiny_model, p) for p in PROMPTS]


def test_chunked_prefill_matches_single_pass(tiny_model: Path) -> None:
    loaded = load_model(ModelConfig(source=str(tiny_model), dtype="float32"))
    runner, blocks = make_runner(loaded)
    prompt = PROMPTS[2]
    table = blocks.allocate("a", len(prompt) + 1)
    runner.forward([SequenceChunk(prompt[:5], 0, table)])
    chunked = runner.forward([SequenceChunk(prompt[5:], 5, table)])
    other = blocks.allocate("b", len(prompt) + 1)
    whole = runner.forward([SequenceChunk(prompt, 0, other)])
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    assert torch.argmax(chunked) == torch.argmax(whole)


def test_prefill_writes_prompt_kv_into_its_blocks_only(tiny_model: Path) -> None:
    loaded = load_model(ModelConfig(source=str(tiny_model), dtype="float32"))
    runner, blocks = make_runner(loaded)
    blocks.allocate("untouched", 8)
    table = blocks.allocate("a", 6)
    runner.forward([SequenceChunk(PROMPTS[0], 0, table)])
    cache = runner.kv_cache
    written = cache.read(0, loaded.num_layers, cache.slots(table, 0, len(PROMPTS[0])))
    assert written.abs().sum(dim=(0, 1, 3, 4)).min() > 0  # every prompt token has KV
    untouched = cache.read(0, loaded.num_layers, cache.slots(blocks.block_table("untouched"), 0, 8))
    assert untouched.abs().sum() == 0
