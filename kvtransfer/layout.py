"""The KV layout both replicas must share, and how one request's KV is cut into chunks.

One request's KV is two arrays, keys and values, each `[num_layers, num_tokens, num_kv_heads,
head_dim]` in `dtype`. A chunk covers layers `[layer_start, layer_end)` x tokens
`[token_start, token_end)`; its bytes are the keys of that block (C order) followed by the
values of the same block. See kvtransfer/README.md for the whole wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.internal.v1 import kv_transfer_pb2

WIRE_FORMAT_VERSION = 1

# Element sizes of the dtypes that may travel on the wire.
_ITEMSIZE_BY_DTYPE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# Fields compared by `KVLayout.mismatch`, version first: a version mismatch explains the rest.
_COMPARED_FIELDS = (
    "format_version",
    "model_fingerprint",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "dtype",
)


@dataclass(frozen=True)
class KVLayout:
    """Model identity and KV shape of one replica; two replicas exchange KV only when equal.

    Raises ValueError at construction when a field is out of range or `dtype` is unknown.
    """

    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    format_version: int = WIRE_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "format_version"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not self.model_fingerprint:
            raise ValueError("model_fingerprint: must not be empty")
        if self.dtype not in _ITEMSIZE_BY_DTYPE:
            valid = ", ".join(sorted(_ITEMSIZE_BY_DTYPE))
            raise ValueError(f"dtype: {self.dtype!r} is not one of {valid}")

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE_BY_DTYPE[self.dtype]

    @property
    def token_row_bytes(self) -> int:
        """Bytes of one token of one layer, keys and values together."""
        return 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def kv_bytes(self, num_tokens: int) -> int:
        """Payload bytes of the whole KV of `num_tokens` tokens (all layers, keys and values)."""
        return self.num_layers * num_tokens * self.token_row_bytes

    def mismatch(self, other: KVLayout) -> str | None:
        """None when equal; else names the first differing field.

        `self` is the sender's layout and `other` the receiver's, e.g.
        "dtype: sender float32, receiver bfloat16".
        """
        for name in _COMPARED_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name}: sender {mine}, receiver {theirs}"
        return None

    def to_proto(self) -> kv_transfer_pb2.KVLayoutProto:
        return kv_transfer_pb2.KVLayoutProto(
            format_version=self.format_version,
            model_fingerprint=self.model_fingerprint,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )

    @classmethod
    def from_proto(cls, proto: kv_transfer_pb2.KVLayoutProto) -> KVLayout:
        """Raises ValueError (naming the field) when the proto holds an invalid layout."""
        return cls(
            model_fingerprint=proto.model_fingerprint,
            num_layers=proto.num_layers,
            num_kv_heads=proto.num_kv_heads,
            head_dim=proto.head_dim,
            dtype=proto.dtype,
            format_version=proto.format_version,
        )


@dataclass(frozen=True)
class ChunkSpec:
    """Where one chunk sits: layers [layer_start, layer_end) x tokens [token_start, token_end).

    `seq` is its 0-based position in the stream.
    """

    seq: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    def num_bytes(self, layout: KVLayout) -> int:
        """Payload bytes of this chunk: keys then values of its block."""
        return self.num_layers * self.num_tokens * layout.token_row_bytes


def plan_chunks(layout: KVLayout, num_tokens: int, chunk_bytes: int) -> list[ChunkSpec]:
    """The canonical tiling of `num_tokens` tokens' KV into chunks of at most `chunk_bytes`.

    Whole layers are grouped while a chunk stays within `chunk_bytes`; a layer bigger than
    `chunk_bytes` is split by token ranges. Chunks come in layer-major order. A chunk exceeds
    `chunk_bytes` only when a single token of a single layer does. Raises ValueError when
    `num_tokens` or `chunk_bytes` is below 1.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens: must be >= 1, got {num_tokens}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: must be >= 1, got {chunk_bytes}")
    layer_bytes = num_tokens * layout.token_row_bytes
    if layer_bytes <= chunk_bytes:
        return _plan_layer_groups(layout.num_layers, num_tokens, chunk_bytes // layer_bytes)
    tokens_per_chunk = max(1, chunk_bytes // layout.token_row_bytes)
    return _plan_token_splits(layout.num_layers, num_tokens, tokens_per_chunk)


def _plan_layer_groups(num_layers: int, num_tokens: int, layers_per_chunk: int) -> list[ChunkSpec]:
    starts = range(0, num_layers, layers_per_chunk)
    return [
        ChunkSpec(seq, start, min(start + layers_per_chunk, num_layers), 0, num_tokens)
        for seq, start in enumerate(starts)
    ]


def _plan_token_splits(num_layers: int, num_tokens: int, tokens_per_chunk: int) -> list[ChunkSpec]:
    chunks: list[ChunkSpec] = []
    for layer in range(num_layers):
        for start in range(0, num_tokens, tokens_per_chunk):
            end = min(start + tokens_per_chunk, num_tokens)
            chunks.append(ChunkSpec(len(chunks), layer, layer + 1, start, end))
    return chunks
