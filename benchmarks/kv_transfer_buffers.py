"""The bytes of the KV transfer benchmark: SmolLM2-135M's KV layout, a source handing out views
of pre-filled random bytes, and a sink that scatters chunks into preallocated arrays.

The source costs nothing per chunk (a view), so a transport's time is its own; the sink copies
every chunk into key and value arrays shaped like the decode replica's cache, so the receive
side does the copy a real decode replica does.
"""

from __future__ import annotations

import crc32c
import numpy as np

from kvtransfer import ChunkSpec, KVLayout, plan_chunks

# SmolLM2-135M: 30 layers, 3 KV heads x 64 dims, fp32 = 46,080 bytes per token.
LAYOUT = KVLayout(
    model_fingerprint="bench", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32"
)
# Bound on one payload (and so on each buffer the benchmark allocates for it): 4 GiB.
MAX_PAYLOAD_BYTES = 4 * 1024**3


def payload_bytes(num_tokens: int) -> int:
    """Bytes of the KV of `num_tokens` tokens; raises ValueError outside [1, MAX_PAYLOAD_BYTES]."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens: must be >= 1, got {num_tokens}")
    num_bytes = LAYOUT.kv_bytes(num_tokens)
    if num_bytes > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"num_tokens: {num_tokens} tokens are {num_bytes} bytes, above {MAX_PAYLOAD_BYTES}"
        )
    return num_bytes


def checked_num_bytes(num_bytes: int) -> int:
    """`num_bytes` when in [1, MAX_PAYLOAD_BYTES]; raises ValueError otherwise."""
    if not 1 <= num_bytes <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"num_bytes: {num_bytes} is not in [1, {MAX_PAYLOAD_BYTES}]")
    return num_bytes


def random_payload(num_tokens: int, seed: int) -> np.ndarray:
    """A read-only 1-D uint8 array of the KV size of `num_tokens` tokens, random bytes."""
    num_bytes = payload_bytes(num_tokens)
    return np.frombuffer(np.random.default_rng(seed).bytes(num_bytes), dtype=np.uint8)


class StreamSource:
    """KVSource over one flat buffer holding the chunks back to back in stream order.

    The canonical tiling walks the (layer, token) grid row-major, so a chunk starts at byte
    `(layer_start * num_tokens + token_start) * token_row_bytes`. `read` returns a view: no copy.
    """

    def __init__(self, num_tokens: int, payload: np.ndarray) -> None:
        if payload.nbytes != payload_bytes(num_tokens):
            raise ValueError(f"payload: {payload.nbytes} bytes for {num_tokens} tokens")
        self._num_tokens = num_tokens
        self._view = payload.data.cast("B")

    def read(self, chunk: ChunkSpec) -> memoryview:
        start = (chunk.layer_start * self._num_tokens + chunk.token_start) * LAYOUT.token_row_bytes
        return self._view[start : start + chunk.num_bytes(LAYOUT)]


class ScatterSink:
    """KVSink copying each chunk's keys and values into `[layers, tokens, row]` uint8 arrays,
    allocated (and touched) once and reused by every transfer of the same size."""

    def __init__(self, num_tokens: int) -> None:
        payload_bytes(num_tokens)
        half_row = LAYOUT.token_row_bytes // 2
        shape = (LAYOUT.num_layers, num_tokens, half_row)
        self.num_tokens = num_tokens
        self.keys = np.full(shape, 0, dtype=np.uint8)
        self.values = np.full(shape, 0, dtype=np.uint8)

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        block = np.frombuffer(data, dtype=np.uint8)
        half = block.nbytes // 2
        shape = (chunk.num_layers, chunk.num_tokens, self.keys.shape[2])
        layers = slice(chunk.layer_start, chunk.layer_end)
        tokens = slice(chunk.token_start, chunk.token_end)
        self.keys[layers, tokens] = block[:half].reshape(shape)
        self.values[layers, tokens] = block[half:].reshape(shape)

    def stream_crc32c(self, chunk_bytes: int) -> int:
        """CRC32C of what was received, re-read in stream order: equals the CRC32C of the
        sender's flat payload exactly when every byte landed where it belongs."""
        crc = 0
        for chunk in plan_chunks(LAYOUT, self.num_tokens, chunk_bytes):
            layers = slice(chunk.layer_start, chunk.layer_end)
            tokens = slice(chunk.token_start, chunk.token_end)
            for array in (self.keys, self.values):
                crc = crc32c.crc32c(np.ascontiguousarray(array[layers, tokens]).data, crc)
        return int(crc)


def payload_crc32c(payload: np.ndarray) -> int:
    return int(crc32c.crc32c(payload.data))
