"""One batched forward pass over packed sequences with the paged KV cache.

The runner owns no scheduling state: callers describe each sequence's new tokens and where its
KV lives (`SequenceChunk`), the runner packs them, runs the model once and returns the logits
of each sequence's last new token. KV of the new tokens is written into the cache as a side
effect. Runs on whichever thread calls it (workers call it off their event loop).

A batch may hold any mix of sequences: prompts (many tokens, nothing cached), prompt chunks
after a cached prefix, and decode steps (one token after a cached context). All index tensors
the attention needs (slots of new tokens, padded context slots of one-token rows, masks) are
built here once per pass with a handful of vectorised ops and reused by every layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.attention import AttentionMetadata, DecodeRows, PrefillRows
from engine.kv_cache import GatherBuffers, PagedKVCache
from engine.model_loader import LoadedModel


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence in a forward pass."""

    token_ids: list[int]
    # Tokens of this sequence whose KV is already in the cache (positions 0..n-1).
    num_cached_tokens: int
    block_table: list[int]

    @property
    def num_context_tokens(self) -> int:
        return self.num_cached_tokens + len(self.token_ids)


class ModelRunner:
    """Runs `LoadedModel` over batches of `SequenceChunk`s against one `PagedKVCache`."""

    def __init__(self, loaded: LoadedModel, kv_cache: PagedKVCache) -> None:
        self.loaded = loaded
        self.kv_cache = kv_cache
        self._decoder: Any = loaded.model.get_decoder()  # type: ignore[operator]
        self._lm_head: Any = loaded.model.get_output_embeddings()  # type: ignore[operator]
        self._gather_buffers = GatherBuffers()
        # Passes share the gather buffers: one at a time (callers already run one at a time).
        self._lock = threading.Lock()

    @torch.inference_mode()
    def forward(
        self,
        chunks: list[SequenceChunk],
        on_layer_written: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Returns float32 logits `[len(chunks), vocab]` of each chunk's last token.

        `on_layer_written(layer)` is called from this thread as each layer's KV lands.
        Blocks for the pass; concurrent calls run one after the other. Raises ValueError for an
        empty batch, an empty chunk or a block table too short for the chunk's context
        (nothing is written then)."""
        _check_chunks(chunks, self.kv_cache.block_size)
        input_ids, position_ids, rows = _pack_inputs(chunks)
        meta = self._metadata(chunks, rows, position_ids[0])
        meta.on_layer_written = on_layer_written
        meta.decode_kernel = self.loaded.decode_attention
        with self._lock:
            meta.gather_buffers = self._gather_buffers
            if self.loaded.lean is not None:
                hidden = self.loaded.lean(input_ids, position_ids, meta)
            else:
                hidden = self._decoder(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    pd_attention=meta,
                ).last_hidden_state[0]  # [total_new_tokens, hidden]
        if hidden.shape[0] != len(chunks):  # some chunk has several tokens: keep each last one
            ends = torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0)
            hidden = hidden.index_select(0, ends - 1)
        return self._lm_head(hidden).float()

    def _metadata(
        self, chunks: list[SequenceChunk], rows: torch.Tensor, positions: torch.Tensor
    ) -> AttentionMetadata:
        cache = self.kv_cache
        tables = cache.block_table_tensor([c.block_table for c in chunks])
        slot_mapping = cache.slots_at(tables, rows, positions)
        meta = AttentionMetadata(kv_cache=cache, slot_mapping=slot_mapping)
        decode_index = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        if decode_index:
            meta.decode = self._decode_rows(chunks, tables, decode_index)
        if len(decode_index) < len(chunks):
            meta.prefills = self._prefill_rows(chunks, tables)
        return meta

    def _decode_rows(
        self, chunks: list[SequenceChunk], tables: torch.Tensor, index: list[int]
    ) -> DecodeRows:
        lengths_list = [chunks[i].num_context_tokens for i in index]
        max_context = max(lengths_list)
        lengths = torch.tensor(lengths_list).unsqueeze(1)  # [rows, 1]
        positions = torch.arange(max_context).unsqueeze(0)  # [1, max_context]
        # Padding positions read the row's last real slot (never past its own table).
        clamped = torch.minimum(positions, lengths - 1)
        row_tables = tables if len(index) == len(chunks) else tables[index]
        context_slots = self.kv_cache.slots_at(
            row_tables, torch.arange(len(index)).unsqueeze(1), clamped
        )  # [rows, max_context]
        mask = None
        if min(lengths_list) < max_context:
            mask = _padding_mask(positions >= lengths, self.loaded.dtype)
        rows = None
        if len(index) < len(chunks):
            starts = _query_starts(chunks)
            rows = torch.tensor([starts[i] for i in index])
        return DecodeRows(
            rows=rows,
            context_slots=context_slots.reshape(-1),
            num_rows=len(index),
            max_context=max_context,
            mask=mask,
            lengths=lengths.view(-1),
        )

    def _prefill_rows(self, chunks: list[SequenceChunk], tables: torch.Tensor) -> list[PrefillRows]:
        prefills = []
        for row, (chunk, start) in enumerate(zip(chunks, _query_starts(chunks))):
            num_tokens = len(chunk.token_ids)
            if num_tokens == 1:
                continue
            num_cached = chunk.num_cached_tokens
            if not num_cached:
                prefills.append(PrefillRows(start, num_tokens, 0))
                continue
            context = torch.arange(chunk.num_context_tokens)
            # Query i (absolute position num_cached + i) sees context positions <= num_cached + i.
            query_positions = torch.arange(num_tokens).unsqueeze(1) + num_cached
            prefills.append(
                PrefillRows(
                    start,
                    num_tokens,
                    num_cached,
                    context_slots=self.kv_cache.slots_at(tables, torch.tensor(row), context),
                    mask=context.unsqueeze(0) <= query_positions,
                )
            )
        return prefills


def _padding_mask(padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[rows, 1, 1, context]` additive mask from a `[rows, context]` padding flag; built once
    per pass in the model dtype (SDPA would convert a boolean mask in every layer)."""
    mask = torch.zeros(padding.shape[0], 1, 1, padding.shape[1], dtype=dtype)
    return mask.masked_fill_(padding[:, None, None, :], float("-inf"))


def _check_chunks(chunks: list[SequenceChunk], block_size: int) -> None:
    if not chunks:
        raise ValueError("forward needs at least one sequence")
    for chunk in chunks:
        if not chunk.token_ids:
            raise ValueError("a sequence chunk needs at least one new token")
        if chunk.num_cached_tokens < 0:
            raise ValueError(f"num_cached_tokens must be >= 0, got {chunk.num_cached_tokens}")
        if len(chunk.block_table) * block_size < chunk.num_context_tokens:
            raise ValueError(
                f"block table of {len(chunk.block_table)} blocks cannot hold "
                f"{chunk.num_context_tokens} tokens (block size {block_size})"
            )


def _pack_inputs(chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[1, N]` token ids and positions of the packed new tokens, and `[N]` chunk index of each."""
    if all(len(c.token_ids) == 1 for c in chunks):
        token_ids = [c.token_ids[0] for c in chunks]
        positions = [c.num_cached_tokens for c in chunks]
        rows = torch.arange(len(chunks))
    else:
        token_ids, positions = [], []
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.num_cached_tokens, chunk.num_context_tokens))
        lengths = torch.tensor([len(c.token_ids) for c in chunks])
        rows = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
    return torch.tensor([token_ids]), torch.tensor([positions]), rows


def _query_starts(chunks: list[SequenceChunk]) -> list[int]:
    starts, offset = [], 0
    for chunk in chunks:
        starts.append(offset)
        offset += len(chunk.token_ids)
    return starts
