"""The dtype a chunk's KV travels in (`kv_transfer.wire_dtype`), and the conversions between it
and the cache's dtype.

The prefill side converts each chunk it read from its KVSource (`encode_chunk`, called by
stream.py before the checksum), the decode side converts it back after the size and checksum
checks (`WireDecoder`, driven by receive_session.py), so every transport carries the wire form.

A chunk's bytes on the wire, by wire dtype (keys then values, each `[layers, tokens, kv_heads,
head_dim]` in C order, little-endian):
- `cache`: exactly the cache's bytes (no conversion);
- `bfloat16`: the values as bfloat16, rounded to nearest even;
- `int8`: the values as int8, then the float32 scales `[2 (keys, values), layers, tokens,
  kv_heads]`.

int8 is symmetric, with one scale per (layer, keys or values, token, KV head): a block is the
`head_dim` values of one head of one token. scale = absmax / 127 (float32); q =
round-half-even(x / scale) clamped to [-127, 127]; the receiver restores q * scale, so
each value is off by at most scale / 2 (plus float32 rounding). An all-zero block has scale 0
and restores zeros. A block holding a non-finite value has a non-finite scale and restores
non-finite values. Per-token blocks keep a chunk's size a whole number of token rows
(`wire_row_bytes`) whatever the tiling, so no scale ever spans two chunks.

A wire dtype must shrink the KV or be the cache's own dtype (bfloat16 over a bfloat16 cache is
`cache`): `check_wire_dtype` refuses anything else, so a non-`cache` chunk is always smaller
than the cache chunk of the same ranges.

numpy does the work, a few vectorised passes over a whole chunk; there is no per-element Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtransfer.errors import TransferDataLoss, TransferFailedPrecondition
from kvtransfer.layout import ChunkSpec, KVLayout

CACHE = "cache"
WIRE_DTYPES = (CACHE, "bfloat16", "int8")

_INT8_MAX = 127
_SCALE_BYTES = 4
# The cache dtypes as numpy sees their bytes; bfloat16 as its raw 16 bits.
_NUMPY_DTYPE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")
}


def check_wire_dtype(layout: KVLayout, wire_dtype: str) -> str:
    """The wire dtype chunks of `layout` travel in when `wire_dtype` is asked for: `cache` when
    it is the cache's own dtype, else `wire_dtype`. Called by the sender before a transfer and
    by the receiver for a header. Raises FAILED_PRECONDITION naming `wire_dtype` when it is
    unknown or would not shrink the KV."""
    if wire_dtype not in WIRE_DTYPES:
        raise TransferFailedPrecondition(
            f"wire_dtype: {wire_dtype!r} is not supported (supported: {', '.join(WIRE_DTYPES)})"
        )
    if wire_dtype == layout.dtype:
        return CACHE
    if wire_dtype != CACHE and wire_row_bytes(layout, wire_dtype) >= layout.token_row_bytes:
        raise TransferFailedPrecondition(
            f"wire_dtype: {wire_dtype} does not shrink a {layout.dtype} cache with head_dim "
            f"{layout.head_dim} (use cache)"
        )
    return wire_dtype


def wire_row_bytes(layout: KVLayout, wire_dtype: str) -> int:
    """Wire bytes of one token of one layer, keys and values together (scales included)."""
    num_values = 2 * layout.num_kv_heads * layout.head_dim
    if wire_dtype == "bfloat16":
        return 2 * num_values
    if wire_dtype == "int8":
        return num_values + 2 * layout.num_kv_heads * _SCALE_BYTES
    return layout.token_row_bytes


def wire_chunk_bytes(layout: KVLayout, wire_dtype: str, spec: ChunkSpec) -> int:
    """Wire bytes of one chunk: what its `data` (or shm range, group or side-channel bytes)
    must measure."""
    return spec.num_layers * spec.num_tokens * wire_row_bytes(layout, wire_dtype)


def wire_bytes(layout: KVLayout, wire_dtype: str, num_tokens: int) -> int:
    """Wire bytes of a whole transfer of `num_tokens` tokens."""
    return layout.num_layers * num_tokens * wire_row_bytes(layout, wire_dtype)


def encode_chunk(
    layout: KVLayout, wire_dtype: str, data: bytes | memoryview
) -> bytes | memoryview:
    """The wire form of one chunk's cache bytes (`data`, already size-checked). `wire_dtype`
    is a value `check_wire_dtype` returned. `cache` returns `data` itself; otherwise a new
    buffer the caller owns. Called on the sender's thread; does not block."""
    if wire_dtype == CACHE:
        return data
    values = _to_float32(np.frombuffer(data, dtype=np.uint8), layout.dtype)
    if wire_dtype == "bfloat16":
        return _bfloat16_bits(values).view(np.uint8).data
    return _quantize_int8(values.reshape(-1, layout.head_dim)).data


class WireDecoder:
    """Turns one push's wire chunks back into cache bytes. Owned and driven by one
    ReceiveSession (one thread); reuses one buffer, grown to the largest chunk."""

    def __init__(self, layout: KVLayout, wire_dtype: str) -> None:
        assert wire_dtype in WIRE_DTYPES and wire_dtype != CACHE, "checked wire dtype"
        self._layout = layout
        self._wire_dtype = wire_dtype
        self._buffer = np.empty(0, dtype=np.uint8)

    def decode(self, spec: ChunkSpec, data: memoryview) -> memoryview:
        """The chunk's cache bytes, valid until the next call. `data` has been checked against
        `wire_chunk_bytes` and its crc32c; a wrong length still raises DATA_LOSS rather than
        misreading. Allocates at most the chunk's cache size."""
        expected = wire_chunk_bytes(self._layout, self._wire_dtype, spec)
        if data.nbytes != expected:
            raise TransferDataLoss(
                f"chunk {spec.seq}: {data.nbytes} wire bytes, expected {expected}"
            )
        num_bytes = spec.num_bytes(self._layout)
        if self._buffer.nbytes < num_bytes:
            self._buffer = np.empty(num_bytes, dtype=np.uint8)
        out = self._buffer[:num_bytes]
        wire = np.frombuffer(data, dtype=np.uint8)
        if self._layout.dtype == "float32":
            # Straight into the output: no float32 temporary to copy.
            _restore_float32(wire, self._wire_dtype, self._layout.head_dim, out.view("<f4"))
        else:
            values = np.empty(num_bytes // self._layout.itemsize, dtype=np.float32)
            _restore_float32(wire, self._wire_dtype, self._layout.head_dim, values)
            _store(values, self._layout.dtype, out)
        return out.data


def _restore_float32(wire: np.ndarray, wire_dtype: str, head_dim: int, out: np.ndarray) -> None:
    """Writes the float32 values of wire bytes into `out` (1-D float32, one per value)."""
    if wire_dtype == "bfloat16":
        np.left_shift(wire.view("<u2"), np.uint32(16), out=out.view(np.uint32))
        return
    num_blocks = out.size // head_dim
    num_values = num_blocks * head_dim
    values = wire[:num_values].view(np.int8).reshape(num_blocks, head_dim)
    scales = wire[num_values:].view("<f4")
    with np.errstate(invalid="ignore"):
        np.multiply(values, scales[:, None], out=out.reshape(num_blocks, head_dim))


def _to_float32(raw: np.ndarray, cache_dtype: str) -> np.ndarray:
    """float32 values of cache bytes (a view for a float32 cache, else a new array)."""
    values = raw.view(_NUMPY_DTYPE[cache_dtype])
    if cache_dtype == "bfloat16":
        return _from_bfloat16_bits(values)
    return values.astype(np.float32, copy=False)


def _store(values: np.ndarray, cache_dtype: str, out: np.ndarray) -> None:
    """Writes float32 `values` into `out` (bytes) in the cache's dtype, rounding to nearest."""
    target = out.view(_NUMPY_DTYPE[cache_dtype]).reshape(values.shape)
    if cache_dtype == "bfloat16":
        target[...] = _bfloat16_bits(values)
    else:
        target[...] = values


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits of float32 values, rounded to nearest even (as torch does); NaN stays NaN."""
    bits = values.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    # NaN payloads in the low bits would otherwise round into an infinity.
    rounded[np.isnan(values)] = 0x7FC0
    return rounded.astype(np.uint16)


def _from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return np.left_shift(bits, np.uint32(16), dtype=np.uint32).view(np.float32)


def _quantize_int8(blocks: np.ndarray) -> np.ndarray:
    """int8 values of `blocks` ([num_blocks, head_dim] float32) followed by their float32
    scales, as one new byte array."""
    num_blocks, head_dim = blocks.shape
    absmax = np.maximum(blocks.max(axis=1), -blocks.min(axis=1))
    scales = (absmax / np.float32(_INT8_MAX)).astype(np.float32)
    # An all-zero block (scale 0) quantizes to zeros, not to 0/0. A division rather than a
    # multiplication by 1 / scale, which overflows for blocks of tiny values.
    divisors = np.where(scales > 0, scales, np.float32(1))
    num_values = num_blocks * head_dim
    out = np.empty(num_values + num_blocks * _SCALE_BYTES, dtype=np.uint8)
    # A non-finite block gives NaN here and casts it to int8 (any value): its non-finite scale
    # decides what the receiver restores anyway.
    with np.errstate(invalid="ignore"):
        scaled = blocks / divisors[:, None]
        np.rint(scaled, out=scaled)
        np.clip(scaled, -_INT8_MAX, _INT8_MAX, out=scaled)
        out[:num_values].view(np.int8).reshape(num_blocks, head_dim)[...] = scaled
    out[num_values:].view("<f4")[...] = scales
    return out
