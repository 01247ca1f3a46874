"""Byte views of one sequence's KV in the paged cache, for the KV transports.

`kvtransfer` moves bytes and never sees tensors; these adapters turn a transfer chunk
(a layer range x token range) into bytes on the prefill side and bytes back into cache slots
on the decode side. Chunk bytes are keys then values, each `[layers, tokens, heads, dim]`.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from engine.kv_cache import PagedKVCache
from engine.layer_progress import LayerProgress


class ChunkRange(Protocol):
    """What the adapters need of `kvtransfer.ChunkSpec` (engine does not import kvtransfer)."""

    @property
    def layer_start(self) -> int: ...
    @property
    def layer_end(self) -> int: ...
    @property
    def token_start(self) -> int: ...
    @property
    def token_end(self) -> int: ...


class PagedKVSource:
    """Reads a sequence's KV chunk by chunk (prefill side). The blocks must stay allocated
    until the transfer using this source has finished; they may be shared with other sequences
    (prefix caching), which is safe because this only reads them."""

    def __init__(
        self,
        cache: PagedKVCache,
        block_table: list[int],
        num_tokens: int,
        progress: LayerProgress | None = None,
        num_ready_tokens: int = 0,
    ) -> None:
        self._cache = cache
        self._slots = cache.slots(block_table, 0, num_tokens)
        # Set while the pass that writes this KV may still be running (layer pipelining).
        self._progress = progress
        # Tokens [0, num_ready_tokens) were in the cache before that pass (a cached prefix):
        # a chunk within them needs no wait.
        self._num_ready_tokens = num_ready_tokens

    def read(self, chunk: ChunkRange) -> memoryview:
        if self._progress is not None and chunk.token_end > self._num_ready_tokens:
            self._progress.wait_for(chunk.layer_end)
        slots = self._slots[chunk.token_start : chunk.token_end]
        kv = self._cache.read(chunk.layer_start, chunk.layer_end, slots).contiguous()
        return memoryview(kv.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


class PagedKVSink:
    """Writes received chunks into a sequence's reserved blocks (decode side)."""

    def __init__(self, cache: PagedKVCache, block_table: list[int], num_tokens: int) -> None:
        self._cache = cache
        self._slots = cache.slots(block_table, 0, num_tokens)

    def write(self, chunk: ChunkRange, data: memoryview) -> None:
        spec = self._cache.spec
        shape = (
            2,
            chunk.layer_end - chunk.layer_start,
            chunk.token_end - chunk.token_start,
            spec.num_kv_heads,
            spec.head_dim,
        )
        with warnings.catch_warnings():
            # The received buffer is read-only; we only read from it before copying.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(data, dtype=torch.uint8)
        kv = raw.view(spec.dtype).view(shape)
        slots = self._slots[chunk.token_start : chunk.token_end]
        self._cache.write(chunk.layer_start, slots, kv)
