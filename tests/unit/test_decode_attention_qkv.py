"""The fused decode-only attention (`decode_attention_qkv`: rotary, KV write and attention of
one layer in one native call) against the three calls it replaces (`rotary_` on the query and
key heads, the cache write, `decode_attention`): bit for bit, in fp32 and bf16, for the fused
product's padded columns; bad slots and lengths refused before anything is written. The native
decode stack (every layer of a decode-only pass in one call) equals the op-by-op path bit for
bit, and only decode-only passes take either (the golden tests in test_model_runner.py run
through the stack)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.block_manager import BlockManager
from engine.kernels import native
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.model_loader import load_model
from engine.model_runner import ModelRunner, SequenceChunk
from pdserve.config import ModelConfig
from tests.factories.model import build_tiny_model_dir


@pytest.fixture(scope="module")
def module() -> object:
    status = native.kernel_status("auto", "bfloat16")
    if not status.native:
        pytest.skip(status.describe())
    return status.module


def _rotary_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    inverse = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * inverse[None, :]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos().to(dtype).contiguous(), both.sin().to(dtype).contiguous()


def _case(dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int):
    """A decode pass of 4 rows over a shuffled cache: qkv with padding columns past v (as the
    fused panels have), each row's new slot the last of its context."""
    generator = torch.Generator().manual_seed(q_heads * 1000 + head_dim)
    num_slots, lengths = 400, torch.tensor([1, 37, 200, 6])
    rows, max_context = len(lengths), int(lengths.max())
    width = (q_heads + 2 * kv_heads) * head_dim + 400
    qkv = torch.randn(rows, width, generator=generator).to(dtype)
    keys = torch.randn(num_slots, kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(num_slots, kv_heads, head_dim, generator=generator).to(dtype)
    order = torch.randperm(num_slots, generator=generator)
    context = torch.zeros(rows, max_context, dtype=torch.long)
    taken = 0
    for row, length in enumerate(lengths.tolist()):
        context[row, :length] = order[taken : taken + length]
        context[row, length:] = context[row, length - 1]  # padding repeats a real slot
        taken += length
    slot_mapping = context[torch.arange(rows), lengths - 1].contiguous()
    cos, sin = _rotary_tables(lengths - 1, head_dim, dtype)
    return qkv, keys, values, slot_mapping, context, lengths, cos, sin


def _heads(qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int):
    """Query, key and value column slices of `qkv`, each starting on a 48-column boundary as the
    fused product's panels do: strided rows, gaps between them."""
    q_width, kv_width = q_heads * head_dim, kv_heads * head_dim
    key_at = -(-q_width // 48) * 48 + 48
    value_at = key_at + -(-kv_width // 48) * 48 + 48
    return (
        qkv[:, :q_width],
        qkv[:, key_at : key_at + kv_width],
        qkv[:, value_at : value_at + kv_width],
    )


def _three_calls(module, qkv, keys, values, slot_mapping, context, lengths, cos, sin, q_heads):
    kv_heads, head_dim = keys.shape[1], keys.shape[2]
    query, key, value = _heads(qkv, q_heads, kv_heads, head_dim)
    if cos is not None:
        module.rotary_(query, head_dim, cos, sin)
        module.rotary_(key, head_dim, cos, sin)
    keys.index_copy_(0, slot_mapping, key.reshape(-1, kv_heads, head_dim))
    values.index_copy_(0, slot_mapping, value.reshape(-1, kv_heads, head_dim))
    queries = query.reshape(-1, q_heads, head_dim).contiguous()
    out = module.decode_attention(queries, keys, values, context, lengths, head_dim**-0.5)
    return out.view(len(lengths), q_heads * head_dim)


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128)])
def test_one_call_equals_the_three_it_replaces(
    module, dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int, rotate: bool
) -> None:
    qkv, keys, values, slot_mapping, context, lengths, cos, sin = _case(
        dtype, q_heads, kv_heads, head_dim
    )
    if not rotate:
        cos = sin = None
    want_qkv, want_keys, want_values = qkv.clone(), keys.clone(), values.clone()
    want = _three_calls(
        module, want_qkv, want_keys, want_values, slot_mapping, context, lengths, cos, sin,
        q_heads,
    )
    got = module.decode_attention_qkv(
        *_heads(qkv, q_heads, kv_heads, head_dim), cos, sin, keys, values, slot_mapping,
        context, lengths, head_dim**-0.5,
    )
    assert got.shape == (len(lengths), q_heads * head_dim) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(qkv, want_qkv), "the query and key heads are rotated in place"
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def test_bad_slots_and_lengths_are_refused_before_anything_is_written(module) -> None:
    qkv, keys, values, slot_mapping, context, lengths, cos, sin = _case(torch.float32, 9, 3, 64)
    before_qkv, before_keys = qkv.clone(), keys.clone()
    query, key, value = _heads(qkv, 9, 3, 64)

    def call(**changes: object) -> None:
        args = dict(
            query=query, key=key, value=value, cos=cos, sin=sin, keys=keys, values=values,
            slot_mapping=slot_mapping, context=context, lengths=lengths,
        )
        args.update(changes)
        module.decode_attention_qkv(*args.values(), 0.125)

    out_of_range = slot_mapping.clone()
    out_of_range[2] = keys.shape[0]
    with pytest.raises(RuntimeError, match="cache slot out of range"):
        call(slot_mapping=out_of_range)
    too_long = lengths.clone()
    too_long[0] = context.shape[1] + 1
    with pytest.raises(RuntimeError, match="lengths must be within"):
        call(lengths=too_long)
    with pytest.raises(RuntimeError, match="cos and sin together"):
        call(sin=None)
    with pytest.raises(RuntimeError, match="hold the cache's heads"):
        call(key=key[:, :100])
    assert torch.equal(qkv, before_qkv) and torch.equal(keys, before_keys)


class _Counted:
    """Delegates to `inner`, counting calls."""

    def __init__(self, inner: object) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args: object) -> object:
        self.calls += 1
        return self.inner(*args)  # type: ignore[operator]


def _run_three_passes(loaded) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A prefill pass, a pass mixing a decode row and a prompt, and a decode-only pass; their
    logits and the cache after them."""
    spec = KVCacheSpec(
        num_layers=loaded.num_layers, num_kv_heads=loaded.num_kv_heads,
        head_dim=loaded.head_dim, dtype=loaded.dtype, block_size=4, num_blocks=16,
    )
    runner, blocks = ModelRunner(loaded, PagedKVCache(spec)), BlockManager(16, 4)
    first, second = blocks.allocate("a", 8), blocks.allocate("b", 8)
    logits = [
        runner.forward([SequenceChunk([5, 17, 42], 0, first)]),
        runner.forward([SequenceChunk([7], 3, first), SequenceChunk([9, 4], 0, second)]),
        runner.forward([SequenceChunk([8], 4, first), SequenceChunk([3], 2, second)]),
    ]
    return logits, runner.kv_cache.tensor.clone()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_decode_only_passes_run_through_the_native_stack_bit_for_bit(
    module, tmp_path: Path, model_type: str, dtype: str
) -> None:
    """Prefill and mixed passes go op by op; a decode-only pass through the native stack (one
    call for every layer), and the stack's logits and KV equal the op-by-op path's (where each
    layer's attention is one `decode_attention_qkv` call) bit for bit."""
    config = ModelConfig(
        source=str(build_tiny_model_dir(tmp_path, model_type)), kernels="native", dtype=dtype
    )
    by_stack, by_layer = load_model(config), load_model(config)
    assert by_stack.lean is not None and by_layer.lean is not None
    by_layer.lean._stack = False  # the op-by-op path only
    layer_calls = _Counted(by_layer.lean._decode_qkv)
    by_layer.lean._decode_qkv = layer_calls

    stack_logits, stack_cache = _run_three_passes(by_stack)
    assert by_stack.lean._stack not in (None, False), "the decode-only pass built the stack"
    layer_logits, layer_cache = _run_three_passes(by_layer)

    assert layer_calls.calls == by_layer.num_layers, "only the decode-only pass, once a layer"
    for got, want in zip(stack_logits, layer_logits):
        assert torch.equal(got, want)
    assert torch.equal(stack_cache, layer_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_split_into_tasks_does_not_change_a_bit(module, dtype: torch.dtype) -> None:
    """With many threads each (row, key head) is a task; with few each row is one (its heads
    read together): the same sums in the same order either way."""
    _, keys, values, _, context, lengths, _, _ = _case(dtype, 9, 3, 64)
    query = torch.randn(len(lengths), 9, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 4 rows >= 2 x 1 thread: one task per row
        per_row = module.decode_attention(query, keys, values, context, lengths, 0.125)
        torch.set_num_threads(4)  # 4 rows < 2 x 4 threads: one task per (row, key head)
        per_head = module.decode_attention(query, keys, values, context, lengths, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(per_row, per_head)
