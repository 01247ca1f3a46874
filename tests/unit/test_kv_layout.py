"""KVLayout math, mismatch messages and the canonical chunk tiling."""

from __future__ import annotations

import random

import pytest

from kvtransfer import WIRE_FORMAT_VERSION, ChunkSpec, KVLayout, plan_chunks

LAYOUT = KVLayout(
    model_fingerprint="fp-1", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32"
)


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_itemsize_and_kv_bytes(dtype: str, itemsize: int) -> None:
    layout = KVLayout("fp", num_layers=5, num_kv_heads=3, head_dim=7, dtype=dtype)
    assert layout.itemsize == itemsize
    assert layout.kv_bytes(11) == 2 * 5 * 11 * 3 * 7 * itemsize
    assert layout.format_version == WIRE_FORMAT_VERSION


def test_equal_layouts_have_no_mismatch() -> None:
    same = KVLayout("fp-1", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32")
    assert LAYOUT.mismatch(same) is None


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("dtype", "bfloat16", "dtype: sender float32, receiver bfloat16"),
        ("num_layers", 4, "num_layers: sender 3, receiver 4"),
        ("num_kv_heads", 1, "num_kv_heads: sender 2, receiver 1"),
        ("head_dim", 16, "head_dim: sender 8, receiver 16"),
        ("model_fingerprint", "fp-2", "model_fingerprint: sender fp-1, receiver fp-2"),
        ("format_version", 2, "format_version: sender 1, receiver 2"),
    ],
)
def test_mismatch_names_the_field(field: str, value: object, expected: str) -> None:
    fields = {
        "model_fingerprint": "fp-1", "num_layers": 3, "num_kv_heads": 2, "head_dim": 8,
        "dtype": "float32", "format_version": 1,
    }
    other = KVLayout(**{**fields, field: value})  # type: ignore[arg-type]
    assert LAYOUT.mismatch(other) == expected


def test_format_version_mismatch_is_reported_first() -> None:
    other = KVLayout("fp-2", num_layers=9, num_kv_heads=2, head_dim=8, dtype="float16",
                     format_version=2)
    message = LAYOUT.mismatch(other)
    assert message is not None and message.startswith("format_version:")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "int8"}, "dtype"),
        ({"num_layers": 0}, "num_layers"),
        ({"head_dim": -1}, "head_dim"),
        ({"model_fingerprint": ""}, "model_fingerprint"),
    ],
)
def test_invalid_layout_raises_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    fields: dict[str, object] = {
        "model_fingerprint": "fp", "num_layers": 2, "num_kv_heads": 2, "head_dim": 4,
        "dtype": "float32",
    }
    with pytest.raises(ValueError, match=f"^{field}:"):
        KVLayout(**{**fields, **kwargs})  # type: ignore[arg-type]


def test_proto_round_trip() -> None:
    layout = KVLayout("abc", num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")
    proto = layout.to_proto()
    assert proto.dtype == "bfloat16" and proto.num_layers == 30
    assert KVLayout.from_proto(proto) == layout


def test_chunk_num_bytes() -> None:
    chunk = ChunkSpec(seq=0, layer_start=1, layer_end=3, token_start=4, token_end=9)
    assert chunk.num_bytes(LAYOUT) == 2 * 2 * 5 * 2 * 8 * 4


def test_whole_layers_are_grouped_when_they_fit() -> None:
    layer_bytes = LAYOUT.kv_bytes(10) // LAYOUT.num_layers
    chunks = plan_chunks(LAYOUT, 10, chunk_bytes=2 * layer_bytes + 1)
    assert [(c.layer_start, c.layer_end, c.token_start, c.token_end) for c in chunks] == [
        (0, 2, 0, 10),
        (2, 3, 0, 10),
    ]


def test_a_layer_larger_than_a_chunk_is_split_by_tokens() -> None:
    row = LAYOUT.token_row_bytes
    chunks = plan_chunks(LAYOUT, 10, chunk_bytes=4 * row)
    assert [(c.layer_start, c.token_start, c.token_end) for c in chunks[:4]] == [
        (0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4),
    ]
    assert len(chunks) == 9


@pytest.mark.parametrize(("num_tokens", "chunk_bytes"), [(0, 4096), (4, 0)])
def test_plan_rejects_empty_inputs(num_tokens: int, chunk_bytes: int) -> None:
    with pytest.raises(ValueError):
        plan_chunks(LAYOUT, num_tokens, chunk_bytes)


def _assert_exact_tiling(layout: KVLayout, num_tokens: int, chunk_bytes: int) -> None:
    chunks = plan_chunks(layout, num_tokens, chunk_bytes)
    covered = [[0] * num_tokens for _ in range(layout.num_layers)]
    previous: tuple[int, int] = (-1, -1)
    for seq, chunk in enumerate(chunks):
        assert chunk.seq == seq
        assert 0 <= chunk.layer_start < chunk.layer_end <= layout.num_layers
        assert 0 <= chunk.token_start < chunk.token_end <= num_tokens
        # Layer-major order.
        assert (chunk.layer_start, chunk.token_start) > previous
        previous = (chunk.layer_start, chunk.token_start)
        if chunk.num_layers > 1:
            assert (chunk.token_start, chunk.token_end) == (0, num_tokens)
        if layout.token_row_bytes <= chunk_bytes:
            assert chunk.num_bytes(layout) <= chunk_bytes
        else:
            assert chunk.num_layers == 1 and chunk.num_tokens == 1
        for layer in range(chunk.layer_start, chunk.layer_end):
            for token in range(chunk.token_start, chunk.token_end):
                covered[layer][token] += 1
    assert all(count == 1 for row in covered for count in row)
    assert sum(c.num_bytes(layout) for c in chunks) == layout.kv_bytes(num_tokens)


def test_plan_tiles_exactly_over_many_sizes() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        layout = KVLayout(
            "fp",
            num_layers=rng.randint(1, 9),
            num_kv_heads=rng.randint(1, 4),
            head_dim=rng.choice([1, 2, 8, 16]),
            dtype=rng.choice(["float32", "bfloat16"]),
        )
        num_tokens = rng.randint(1, 70)
        chunk_bytes = rng.randint(1, layout.kv_bytes(num_tokens) + 64)
        _assert_exact_tiling(layout, num_tokens, chunk_bytes)
