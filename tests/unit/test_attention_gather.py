"""The index and gather helpers the paged attention builds on: vectorised slot lookup agrees
with the per-sequence one, and gathers into reused buffers return exactly the cached rows."""

from __future__ import annotations

import torch

from engine.kv_cache import GatherBuffers, KVCacheSpec, PagedKVCache

BLOCK_SIZE = 4


def make_cache(dtype: torch.dtype = torch.float32) -> PagedKVCache:
    spec = KVCacheSpec(
        num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype, block_size=BLOCK_SIZE,
        num_blocks=16,
    )
    cache = PagedKVCache(spec)
    torch.manual_seed(0)
    cache.tensor.copy_(torch.randn(cache.tensor.shape))
    return cache


def test_slots_at_matches_slots_for_tables_of_different_lengths() -> None:
    cache = make_cache()
    tables = [[5, 2, 9], [7], [0, 15, 3, 11]]
    padded = cache.block_table_tensor(tables)
    assert padded.shape == (3, 4)
    for row, table in enumerate(tables):
        num_tokens = len(table) * BLOCK_SIZE
        positions = torch.arange(num_tokens)
        got = cache.slots_at(padded, torch.full((num_tokens,), row), positions)
        assert got.tolist() == cache.slots(table, 0, num_tokens).tolist()


def test_gather_layer_returns_the_rows_at_the_slots() -> None:
    cache = make_cache()
    slots = torch.tensor([17, 3, 3, 40, 0])
    keys, values = cache.gather_layer(1, slots)
    assert keys.shape == (5, 2, 8)
    torch.testing.assert_close(keys, cache.tensor[0, 1, slots], rtol=0, atol=0)
    torch.testing.assert_close(values, cache.tensor[1, 1, slots], rtol=0, atol=0)


def test_gathers_into_buffers_reuse_them_and_stay_exact() -> None:
    cache = make_cache(torch.bfloat16)
    buffers = GatherBuffers()
    first_slots = torch.tensor([1, 2, 3, 4, 5, 6])
    keys, _ = cache.gather_layer(0, first_slots, buffers)
    first_pointer = keys.data_ptr()
    # Fewer rows (another layer, a smaller batch): same storage, exact rows.
    smaller = torch.tensor([9, 8, 7])
    keys, values = cache.gather_layer(2, smaller, buffers)
    assert keys.data_ptr() == first_pointer
    assert torch.equal(keys, cache.tensor[0, 2, smaller])
    assert torch.equal(values, cache.tensor[1, 2, smaller])
    # More rows than it holds: it grows, and the rows are still exact.
    larger = torch.arange(20, 60)
    keys, values = cache.gather_layer(1, larger, buffers)
    assert keys.shape == (40, 2, 8)
    assert torch.equal(keys, cache.tensor[0, 1, larger])
    assert torch.equal(values, cache.tensor[1, 1, larger])
