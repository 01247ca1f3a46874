"""One batched forward pass over packed sequences with the paged KV cache.

The runner owns no scheduling state: callers describe each sequence's new tokens and where its
KV lives (`SequenceChunk`), the runner packs them, runs the model once and returns the logits
of each sequence's last new token. KV of the new tokens is written into the cache as a side
effect. Runs on whichever thread calls it (workers call it off their event loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.attention import AttentionMetadata
from engine.kv_cache import PagedKVCache
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

    @torch.inference_mode()
    def forward(
        self,
        chunks: list[SequenceChunk],
        on_layer_written: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Returns float32 logits `[len(chunks), vocab]` of each chunk's last token.

        `on_layer_written(layer)` is called from this thread as each layer's KV lands."""
        if not chunks:
            raise ValueError("forward needs at least one sequence")
        input_ids, position_ids = self._pack_inputs(chunks)
        meta = self._metadata(chunks)
        meta.on_layer_written = on_layer_written
        hidden = self._decoder(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, pd_attention=meta
        ).last_hidden_state  # [1, total_new_tokens, hidden]
        last_rows = [start + n - 1 for start, n in zip(meta.query_starts, meta.query_lens)]
        return self._lm_head(hidden[0, last_rows]).float()

    def _pack_inputs(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        token_ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.num_cached_tokens, chunk.num_context_tokens))
        return torch.tensor([token_ids]), torch.tensor([positions])

    def _metadata(self, chunks: list[SequenceChunk]) -> AttentionMetadata:
        cache = self.kv_cache
        query_lens = [len(c.token_ids) for c in chunks]
        query_starts = [sum(query_lens[:i]) for i in range(len(chunks))]
        slot_mapping = torch.cat(
            [cache.slots(c.block_table, c.num_cached_tokens, c.num_context_tokens) for c in chunks]
        )
        meta = AttentionMetadata(
            kv_cache=cache,
            slot_mapping=slot_mapping,
            query_starts=query_starts,
            query_lens=query_lens,
            num_cached_tokens=[c.num_cached_tokens for c in chunks],
        )
        if all(n == 1 for n in query_lens):
            meta.context_slots, meta.context_mask = self._decode_context(chunks)
        elif any(c.num_cached_tokens for c in chunks):
            meta.prefix_context_slots = [
                cache.slots(c.block_table, 0, c.num_context_tokens) if c.num_cached_tokens else None
                for c in chunks
            ]
        return meta

    def _decode_context(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        max_context = max(c.num_context_tokens for c in chunks)
        context_slots = torch.zeros(len(chunks), max_context, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            context_slots[row, : chunk.num_context_tokens] = self.kv_cache.slots(
                chunk.block_table, 0, chunk.num_context_tokens
            )
        lengths = torch.tensor([c.num_context_tokens for c in chunks])
        mask = torch.arange(max_context).unsqueeze(0) < lengths.unsqueeze(1)
        return context_slots, mask[:, None, None, :]  # [B, 1, 1, max_context]
