"""The engine alone (no Ray, no gRPC): packed prefill + paged batched decode reproduce
`transformers`' greedy `generate()` token for token, on torch's kernels and on pdserve's native
ones (`model.kernels`; `auto` is torch's where this CPU lacks what they need)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.block_manager import BlockManager
from engine.kernels.linear import quantize_int8
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.model_loader import LoadedModel, _pack_linear_weights, load_model
from engine.model_runner import ModelRunner, SequenceChunk
from engine.sampler import sample
from pdserve.config import ModelConfig
from pdserve.errors import ConfigError
from pdserve.messages import SamplingParams
from tests.factories.model import build_tiny_model_dir

PROMPTS = [[5, 17, 42, 99, 7, 3], [11, 12], [200, 150, 30, 31, 32, 33, 34, 35, 36, 37, 38], [64]]
NUM_NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def reference(path: Path, prompt: list[int], dtype: torch.dtype = torch.float32) -> list[int]:
    return greedy_generate(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), prompt)


def greedy_generate(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    """transformers' greedy `generate()` of NUM_NEW_TOKENS after `prompt`, EOS ignored."""
    out = model.generate(  # type: ignore[operator]
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
    num = len(prompts)
    outputs = [[t] for t in sample(runner.forward(chunks), [GREEDY] * num, [0] * num)]
    for step in range(1, NUM_NEW_TOKENS):
        chunks = [
            SequenceChunk([out[-1]], len(p) + step - 1, t)
            for p, out, t in zip(prompts, outputs, tables)
        ]
        logits = runner.forward(chunks)
        for out, token in zip(outputs, sample(logits, [GREEDY] * num, [step] * num)):
            out.append(token)
    return outputs


@pytest.mark.parametrize(
    ("kernels", "forward"), [("torch", "transformers"), ("torch", "lean"), ("auto", "lean")]
)
def test_packed_prefill_and_batched_decode_match_generate(
    tiny_model: Path, kernels: str, forward: str
) -> None:
    config = ModelConfig(source=str(tiny_model), dtype="float32", kernels=kernels, forward=forward)
    loaded = load_model(config)
    assert (loaded.lean is not None) == (forward == "lean")
    assert loaded.kernels.endswith(f"{forward} forward")
    runner, blocks = make_runner(loaded)
    outputs = generate_batched(runner, blocks, PROMPTS)
    assert outputs == [reference(tiny_model, p) for p in PROMPTS]


@pytest.mark.parametrize(
    ("kernels", "forward"), [("torch", "transformers"), ("torch", "lean"), ("auto", "lean")]
)
def test_bfloat16_decode_matches_generate(tiny_model: Path, kernels: str, forward: str) -> None:
    """Each prompt alone: in bf16, padding a batch to its longest context changes the order of
    SDPA's sums and can flip a rounding (as it would in transformers' own padded batches)."""
    config = ModelConfig(source=str(tiny_model), dtype="bfloat16", kernels=kernels, forward=forward)
    loaded = load_model(config)
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, "bf16 linears are swapped for oneDNN-packed or native ones"
    if kernels == "torch":
        assert loaded.kernels.startswith("torch (model.kernels is torch)")
    for prompt in PROMPTS:
        runner, blocks = make_runner(loaded)
        [output] = generate_batched(runner, blocks, [prompt])
        assert output == reference(tiny_model, prompt, torch.bfloat16), f"prompt {prompt}"


def test_int8_weights_match_generate_on_the_dequantized_weights(tiny_model: Path) -> None:
    """Weight-only int8 computes with `q * scale`: transformers on those very weights is its
    oracle (fp32 activations on both sides)."""
    config = ModelConfig(source=str(tiny_model), dtype="float32", quantization="int8")
    loaded = load_model(config)
    if not loaded.kernels.startswith("native"):
        pytest.skip(loaded.kernels)
    assert "int8 weights" in loaded.kernels
    dequantized = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for module in dequantized.modules():
            if isinstance(module, torch.nn.Linear):
                quantized, scales = quantize_int8(module.weight)
                module.weight.copy_(quantized.float() * scales[:, None])
    runner, blocks = make_runner(loaded)
    outputs = generate_batched(runner, blocks, PROMPTS)
    for prompt, output in zip(PROMPTS, outputs):
        assert output == greedy_generate(dequantized, prompt), f"prompt {prompt}"


def test_int8_without_the_native_kernels_is_refused(tiny_model: Path) -> None:
    config = ModelConfig(source=str(tiny_model), kernels="torch", quantization="int8")
    with pytest.raises(ConfigError, match="model.quantization int8 needs the native kernels"):
        load_model(config)


def test_packed_linear_is_bit_identical_to_linear() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    inputs = torch.randn(1, 7, 64, dtype=torch.bfloat16)
    expected = linear(inputs)
    model = torch.nn.Sequential(linear)
    _pack_linear_weights(model)
    assert not isinstance(model[0], torch.nn.Linear)
    with torch.inference_mode():
        assert torch.equal(model(inputs), expected)


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


def _prefill_alone(runner: ModelRunner, blocks: BlockManager, owner: str, prompt: list[int]):
    table = blocks.allocate(owner, len(prompt) + 4)
    return table, runner.forward([SequenceChunk(prompt, 0, table)])


def test_mixed_batch_matches_each_sequence_alone(tiny_model: Path) -> None:
    """One pass over a prompt chunk after a cached prefix, decode tokens with different context
    lengths, a whole prompt and a one-token prompt gives each sequence the logits it gets when
    run alone, and writes the same KV."""
    loaded = load_model(ModelConfig(source=str(tiny_model), dtype="float32"))
    alone, alone_blocks = make_runner(loaded)
    mixed, mixed_blocks = make_runner(loaded)
    long_prompt, short_prompt, long_decode = PROMPTS[2], PROMPTS[1], PROMPTS[0]
    expected = []
    mixed_chunks = []
    # A prompt chunk after 5 cached tokens.
    for runner, blocks in ((alone, alone_blocks), (mixed, mixed_blocks)):
        table, _ = _prefill_alone(runner, blocks, "chunked", long_prompt[:5])
        chunk = SequenceChunk(long_prompt[5:], 5, table)
        if runner is alone:
            expected.append(runner.forward([chunk]))
        else:
            mixed_chunks.append(chunk)
    # Two decode steps over contexts of different lengths (the shorter one is padded).
    for owner, prompt in (("short", short_prompt), ("long", long_decode)):
        for runner, blocks in ((alone, alone_blocks), (mixed, mixed_blocks)):
            table, logits = _prefill_alone(runner, blocks, owner, prompt)
            chunk = SequenceChunk([int(torch.argmax(logits))], len(prompt), table)
            if runner is alone:
                expected.append(runner.forward([chunk]))
            else:
                mixed_chunks.append(chunk)
    # A whole prompt and a one-token prompt, nothing cached.
    for owner, prompt in (("whole", PROMPTS[0]), ("single", PROMPTS[3])):
        alone_table = alone_blocks.allocate(owner, len(prompt))
        expected.append(alone.forward([SequenceChunk(prompt, 0, alone_table)]))
        mixed_chunks.append(SequenceChunk(prompt, 0, mixed_blocks.allocate(owner, len(prompt))))

    logits = mixed.forward(mixed_chunks)

    torch.testing.assert_close(logits, torch.cat(expected), rtol=1e-4, atol=1e-4)
    assert torch.argmax(logits, dim=-1).tolist() == [int(torch.argmax(e)) for e in expected]
    for chunk, owner in zip(mixed_chunks, ("chunked", "short", "long", "whole", "single")):
        num_tokens = chunk.num_context_tokens
        got = mixed.kv_cache.read(
            0, loaded.num_layers, mixed.kv_cache.slots(chunk.block_table, 0, num_tokens)
        )
        want = alone.kv_cache.read(
            0, loaded.num_layers,
            alone.kv_cache.slots(alone_blocks.block_table(owner), 0, num_tokens),
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "chunk",
    [
        SequenceChunk([1, 2, 3], 2, [0]),  # 5 tokens do not fit one block of 4
        SequenceChunk([], 0, [0]),
        SequenceChunk([1], -1, [0]),
    ],
)
def test_bad_chunks_are_refused_before_anything_is_written(
    tiny_model: Path, chunk: SequenceChunk
) -> None:
    loaded = load_model(ModelConfig(source=str(tiny_model), dtype="float32"))
    runner, _ = make_runner(loaded)
    with pytest.raises(ValueError):
        runner.forward([SequenceChunk([7], 0, [1]), chunk])
    assert runner.kv_cache.tensor.abs().sum() == 0
