"""PagedKVSource / PagedKVSink: one sequence's KV read chunk by chunk from one paged cache and
written into another with a different block table and block size arrives intact."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.kv_io import PagedKVSink, PagedKVSource
from engine.layer_progress import LayerProgress
from kvtransfer import ChunkSpec, KVLayout, plan_chunks

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 3, 2, 8
NUM_TOKENS = 19
SOURCE_BLOCK_SIZE, SOURCE_TABLE = 4, [9, 2, 14, 5, 11]  # 20 slots, out of order
TARGET_BLOCK_SIZE, TARGET_TABLE = 3, [17, 0, 8, 3, 12, 6, 15]  # 21 slots, out of order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_cache(dtype: torch.dtype, block_size: int, num_blocks: int) -> PagedKVCache:
    return PagedKVCache(
        KVCacheSpec(
            num_layers=NUM_LAYERS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            dtype=dtype,
            block_size=block_size,
            num_blocks=num_blocks,
        )
    )


def slot(table: list[int], block_size: int, token: int) -> int:
    return table[token // block_size] * block_size + token % block_size


def token_kv(cache: PagedKVCache, table: list[int], token: int) -> torch.Tensor:
    """K/V of one token, all layers: `[2, layers, heads, dim]`."""
    return cache.tensor[:, :, slot(table, cache.block_size, token)]


def filled_source(dtype: torch.dtype) -> PagedKVCache:
    cache = make_cache(dtype, SOURCE_BLOCK_SIZE, 16)
    generator = torch.Generator().manual_seed(0)
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=generator).to(dtype))
    return cache


def layout_for(dtype_name: str) -> KVLayout:
    return KVLayout(
        model_fingerprint="test",
        num_layers=NUM_LAYERS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype_name,
    )


def expected_chunk(cache: PagedKVCache, chunk: ChunkSpec) -> torch.Tensor:
    """`[2, layers, tokens, heads, dim]` of `chunk`, gathered token by token."""
    tokens = [
        token_kv(cache, SOURCE_TABLE, t)[:, chunk.layer_start : chunk.layer_end]
        for t in range(chunk.token_start, chunk.token_end)
    ]
    return torch.stack(tokens, dim=2)


# 1 MiB: one chunk; 5000: whole layers grouped (2 + 1 layers in fp32); 1 KiB: layers split by
# token ranges; 1 byte: one token of one layer per chunk.
CHUNK_BYTES = [1 << 20, 5000, 1024, 1]


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("chunk_bytes", CHUNK_BYTES)
def test_source_chunks_are_keys_then_values_of_their_block(
    dtype_name: str, chunk_bytes: int
) -> None:
    dtype = DTYPES[dtype_name]
    cache = filled_source(dtype)
    layout = layout_for(dtype_name)
    source = PagedKVSource(cache, SOURCE_TABLE, NUM_TOKENS)
    chunks = plan_chunks(layout, NUM_TOKENS, chunk_bytes)
    total = 0
    for chunk in chunks:
        data = source.read(chunk)
        assert len(bytes(data)) == chunk.num_bytes(layout)
        total += len(bytes(data))
        got = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
        shape = (2, chunk.num_layers, chunk.num_tokens, NUM_KV_HEADS, HEAD_DIM)
        assert torch.equal(got.view(shape), expected_chunk(cache, chunk))
    assert total == layout.kv_bytes(NUM_TOKENS)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("chunk_bytes", CHUNK_BYTES)
@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
def test_round_trip_into_a_different_paged_cache(
    dtype_name: str, chunk_bytes: int, reverse: bool
) -> None:
    dtype = DTYPES[dtype_name]
    source_cache = filled_source(dtype)
    target_cache = make_cache(dtype, TARGET_BLOCK_SIZE, 20)
    layout = layout_for(dtype_name)
    source = PagedKVSource(source_cache, SOURCE_TABLE, NUM_TOKENS)
    sink = PagedKVSink(target_cache, TARGET_TABLE, NUM_TOKENS)
    chunks = plan_chunks(layout, NUM_TOKENS, chunk_bytes)
    for chunk in reversed(chunks) if reverse else chunks:
        data = source.read(chunk)
        # The receiver hands the sink a read-only view of a buffer it owns.
        sink.write(chunk, memoryview(bytes(data)))

    for token in range(NUM_TOKENS):
        assert torch.equal(
            token_kv(target_cache, TARGET_TABLE, token),
            token_kv(source_cache, SOURCE_TABLE, token),
        ), f"token {token}"
    written = {slot(TARGET_TABLE, TARGET_BLOCK_SIZE, t) for t in range(NUM_TOKENS)}
    untouched = [s for s in range(target_cache.tensor.shape[2]) if s not in written]
    # Other blocks and the reserved-but-unused tail of the last block stay zero.
    assert slot(TARGET_TABLE, TARGET_BLOCK_SIZE, NUM_TOKENS) in untouched
    assert target_cache.tensor[:, :, untouched].abs().sum() == 0


def test_sink_writes_only_the_chunk_it_is_given() -> None:
    dtype = torch.float32
    source_cache = filled_source(dtype)
    target_cache = make_cache(dtype, TARGET_BLOCK_SIZE, 20)
    layout = layout_for("float32")
    chunks = plan_chunks(layout, NUM_TOKENS, 1024)
    assert len(chunks) > 2
    chunk = chunks[1]
    data = PagedKVSource(source_cache, SOURCE_TABLE, NUM_TOKENS).read(chunk)
    PagedKVSink(target_cache, TARGET_TABLE, NUM_TOKENS).write(chunk, memoryview(bytes(data)))
    for layer in range(NUM_LAYERS):
        for token in range(NUM_TOKENS):
            target = target_cache.tensor[:, layer, slot(TARGET_TABLE, TARGET_BLOCK_SIZE, token)]
            inside = chunk.layer_start <= layer < chunk.layer_end and (
                chunk.token_start <= token < chunk.token_end
            )
            if inside:
                source = source_cache.tensor[:, layer, slot(SOURCE_TABLE, SOURCE_BLOCK_SIZE, token)]
                assert torch.equal(target, source)
            else:
                assert target.abs().sum() == 0, (layer, token)


def test_source_waits_for_the_layers_of_a_chunk_being_computed() -> None:
    cache = filled_source(torch.float32)
    progress = LayerProgress(NUM_LAYERS)
    source = PagedKVSource(cache, SOURCE_TABLE, NUM_TOKENS, progress)
    chunk = ChunkSpec(0, 1, 3, 0, NUM_TOKENS)  # needs layers 0..2
    results: list[bytes] = []
    reader = threading.Thread(target=lambda: results.append(bytes(source.read(chunk))))
    progress.layer_written(0)
    progress.layer_written(1)
    reader.start()
    reader.join(0.1)
    assert reader.is_alive() and not results, "read a chunk before its last layer was written"
    progress.layer_written(2)
    reader.join(5)
    assert not reader.is_alive()
    got = torch.frombuffer(bytearray(results[0]), dtype=torch.float32)
    expected = expected_chunk(cache, chunk)
    assert torch.equal(got.view(expected.shape), expected)


def test_source_raises_the_error_of_a_failed_pass() -> None:
    progress = LayerProgress(NUM_LAYERS)
    source = PagedKVSource(filled_source(torch.float32), SOURCE_TABLE, NUM_TOKENS, progress)
    progress.layer_written(0)
    assert len(bytes(source.read(ChunkSpec(0, 0, 1, 0, NUM_TOKENS)))) > 0  # layer 0 is there
    errors: list[BaseException] = []

    def read_layer_two() -> None:
        try:
            source.read(ChunkSpec(1, 2, 3, 0, NUM_TOKENS))
        except RuntimeError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_layer_two)
    reader.start()
    progress.fail(RuntimeError("pass failed"))
    reader.join(5)
    assert not reader.is_alive()
    assert [str(e) for e in errors] == ["pass failed"]
