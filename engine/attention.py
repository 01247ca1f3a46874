"""Attention over packed sequences with a paged KV cache, plugged into transformers models.

pdserve runs the model's own modules (so any transformers causal LM with standard attention
works: Llama, Mistral, Qwen2, Qwen3, ...) and replaces only the attention kernel. The model is
called with all sequences of a batch packed into one row (`[1, total_new_tokens]`) and an
`AttentionMetadata` passed explicitly as the `pd_attention` keyword, which transformers hands
to the attention function of every layer. For each layer the function:

1. writes the new tokens' keys/values (already rotary-embedded) into their cache slots;
2. computes each sequence's attention over its cached + new tokens.

Prefill sequences with nothing cached attend over their own new tokens (causal); decode
sequences (one new token each) are batched: their contexts are gathered from the cache into a
padded `[batch, max_context, heads, dim]` tensor with a padding mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.kv_cache import PagedKVCache

ATTENTION_NAME = "pdserve_paged"


@dataclass
class AttentionMetadata:
    """Where the batch's tokens are and where their KV goes; built per forward pass."""

    kv_cache: PagedKVCache
    # [total_new_tokens]: cache slot of every new token, in packed order.
    slot_mapping: torch.Tensor
    # Per sequence: offsets of its new tokens in the packed row, and its cached-token count.
    query_starts: list[int]
    query_lens: list[int]
    num_cached_tokens: list[int]
    # Decode batches only (every query_len == 1): [batch, max_context] slots of each
    # sequence's whole context (padding slots point at slot 0) and the [batch, 1, 1, max_context]
    # mask of real positions.
    context_slots: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    # Prefill sequences with cached tokens: slots of their whole context (else None).
    prefix_context_slots: list[torch.Tensor | None] | None = None
    # Told each layer whose new KV is in the cache (layer-pipelined KV sends wait on it).
    on_layer_written: Callable[[int], None] | None = None

    @property
    def is_decode(self) -> bool:
        return self.context_slots is not None


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query `[1, q_heads, N, dim]`, key/value
    `[1, kv_heads, N, dim]` for the N packed new tokens; returns `[1, N, q_heads, dim]`."""
    meta = kwargs.get("pd_attention")
    if not isinstance(meta, AttentionMetadata):
        raise RuntimeError("pdserve attention called without AttentionMetadata (pd_attention=)")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    new_keys = key[0].transpose(0, 1)  # [N, kv_heads, dim]
    new_values = value[0].transpose(0, 1)
    meta.kv_cache.write_layer(layer, meta.slot_mapping, new_keys, new_values)
    if meta.on_layer_written is not None:
        meta.on_layer_written(layer)
    if meta.is_decode:
        out = _decode_attention(meta, layer, query, scaling)
    else:
        out = _prefill_attention(meta, layer, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _decode_attention(
    meta: AttentionMetadata, layer: int, query: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    cache_keys, cache_values = meta.kv_cache.layer(layer)
    assert meta.context_slots is not None
    batch_queries = query[0].transpose(0, 1).unsqueeze(2)  # [B, q_heads, 1, dim]
    keys = cache_keys[meta.context_slots].transpose(1, 2)  # [B, kv_heads, ctx, dim]
    values = cache_values[meta.context_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        batch_queries,
        keys.to(query.dtype),
        values.to(query.dtype),
        attn_mask=meta.context_mask,
        scale=scaling,
        enable_gqa=True,
    )  # [B, q_heads, 1, dim]
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, q_heads, B, dim]


def _prefill_attention(
    meta: AttentionMetadata,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    outputs = []
    for index, start in enumerate(meta.query_starts):
        end = start + meta.query_lens[index]
        seq_query = query[:, :, start:end]
        prefix_slots = meta.prefix_context_slots[index] if meta.prefix_context_slots else None
        if prefix_slots is None:
            out = F.scaled_dot_product_attention(
                seq_query,
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=True,
                scale=scaling,
                enable_gqa=True,
            )
        else:
            out = _attend_with_prefix(meta, layer, seq_query, prefix_slots, index, scaling)
        outputs.append(out)
    return torch.cat(outputs, dim=2)


def _attend_with_prefix(
    meta: AttentionMetadata,
    layer: int,
    seq_query: torch.Tensor,
    context_slots: torch.Tensor,
    index: int,
    scaling: float | None,
) -> torch.Tensor:
    """New tokens of a sequence whose first tokens are already cached (chunked prefill)."""
    cache_keys, cache_values = meta.kv_cache.layer(layer)
    keys = cache_keys[context_slots].transpose(0, 1).unsqueeze(0).to(seq_query.dtype)
    values = cache_values[context_slots].transpose(0, 1).unsqueeze(0).to(seq_query.dtype)
    num_new = seq_query.shape[2]
    num_cached = meta.num_cached_tokens[index]
    # Query i (absolute position num_cached + i) sees context positions <= num_cached + i.
    query_pos = torch.arange(num_new).unsqueeze(1) + num_cached
    mask = torch.arange(num_cached + num_new).unsqueeze(0) <= query_pos
    return F.scaled_dot_product_attention(
        seq_query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True
    )


def register_paged_attention() -> str:
    """Registers the kernel with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
