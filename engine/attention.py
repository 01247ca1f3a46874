"""Attention over packed sequences with a paged KV cache, plugged into transformers models.

pdserve runs the model's own modules (so any transformers causal LM with standard attention
works: Llama, Mistral, Qwen2, Qwen3, ...) and replaces only the attention kernel. The model is
called with all sequences of a batch packed into one row (`[1, total_new_tokens]`) and an
`AttentionMetadata` passed explicitly as the `pd_attention` keyword, which transformers hands
to the attention function of every layer. For each layer the function:

1. writes the new tokens' keys/values (already rotary-embedded) into their cache slots;
2. computes each sequence's attention over its cached + new tokens.

Sequences with one new token (decode steps, and the last one-token chunk of a prompt) are
attended together: their contexts are gathered from the cache into a padded
`[rows, max_context, kv_heads, dim]` batch (one `index_select` per layer, with slot indices
built once per forward pass) and masked. Sequences with several new tokens (prefill chunks)
are attended one by one: causally over their own tokens, or over their cached prefix + new
tokens. A batch may mix both kinds (colocated replicas run prefill chunks beside decode
tokens); each token's output lands in its packed position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.kv_cache import GatherBuffers, PagedKVCache

ATTENTION_NAME = "pdserve_paged"

# (query [rows, q_heads, dim], keys, values [slots, kv_heads, dim], context slots
# [rows, max_context], lengths [rows], scale) -> [rows, q_heads, dim]
DecodeKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]
# (query [rows, q_heads * dim], key, value [rows, kv_heads * dim] (rows may be strided), cos,
# sin [rows, dim] or None, keys, values [slots, kv_heads, dim], the new tokens' slots [rows],
# context slots [rows, max_context], lengths [rows], scale) -> [rows, q_heads * dim]: rotary,
# KV write and attention of a decode-only pass in one call.
DecodeQKVKernel = Callable[
    [
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float,
    ],
    torch.Tensor,
]


@dataclass(frozen=True)
class DecodeRows:
    """Sequences with exactly one new token, attended as one padded batch."""

    # [num_rows]: packed positions of their tokens; None when they are the whole batch, in order.
    rows: torch.Tensor | None
    # [num_rows * max_context]: slots of every row's whole context (row-major). Padding
    # positions repeat one of the row's own slots and are masked out.
    context_slots: torch.Tensor
    num_rows: int
    max_context: int
    # [num_rows, 1, 1, max_context] additive mask (0 real, -inf padding) in the model dtype;
    # None when every row's context is max_context long.
    mask: torch.Tensor | None
    # [num_rows] int64: each row's context length (what the native kernel reads).
    lengths: torch.Tensor


@dataclass(frozen=True)
class PrefillRows:
    """One sequence with several new tokens, at packed positions [start, start + num_tokens)."""

    start: int
    num_tokens: int
    num_cached_tokens: int
    # With cached tokens: slots of the whole context [0, num_cached + num_tokens) and the
    # [num_tokens, context] causal mask; None when nothing is cached (plain causal attention).
    context_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Where the batch's tokens are and where their KV goes; built once per forward pass and
    read by every layer."""

    kv_cache: PagedKVCache
    # [total_new_tokens]: cache slot of every new token, in packed order.
    slot_mapping: torch.Tensor
    decode: DecodeRows | None = None
    prefills: list[PrefillRows] = field(default_factory=list)
    # Where layers gather contexts into (reused across layers); None = fresh tensors.
    gather_buffers: GatherBuffers | None = None
    # Told each layer whose new KV is in the cache (layer-pipelined KV sends wait on it).
    on_layer_written: Callable[[int], None] | None = None
    # The native one-token attention (`engine.kernels`), reading contexts in place; None =
    # gather + SDPA.
    decode_kernel: DecodeKernel | None = None


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
    queries = query[0].transpose(0, 1)  # [N, q_heads, dim]
    decode = meta.decode
    if decode is not None and decode.rows is None:
        return _decode_attention(meta, layer, queries, decode, scaling).unsqueeze(0), None
    out = torch.empty_like(queries)
    for prefill in meta.prefills:
        end = prefill.start + prefill.num_tokens
        out[prefill.start : end] = _prefill_attention(
            meta, layer, queries[prefill.start : end], key, value, prefill, scaling
        )
    if decode is not None:
        decode_queries = queries.index_select(0, decode.rows)  # type: ignore[arg-type]
        decode_out = _decode_attention(meta, layer, decode_queries, decode, scaling)
        out.index_copy_(0, decode.rows, decode_out)  # type: ignore[arg-type]
    return out.unsqueeze(0), None


def native_decode_rows(
    meta: AttentionMetadata, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows' context slots `[rows, max_context]` and lengths when the pass is decode-only
    and its cache suits the native decode kernels (activations' `dtype`, head size a multiple
    of 16) and nobody waits on each layer's KV; else None."""
    decode = meta.decode
    if decode is None or decode.rows is not None or meta.prefills:
        return None
    spec = meta.kv_cache.spec
    if spec.dtype != dtype or spec.head_dim % 16 or meta.on_layer_written is not None:
        return None
    return decode.context_slots.view(decode.num_rows, decode.max_context), decode.lengths


def decode_only_attention(
    meta: AttentionMetadata,
    layer: int,
    new_heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    scaling: float,
    kernel: DecodeQKVKernel | None,
) -> torch.Tensor | None:
    """A decode-only pass's attention of one layer from the new tokens' query, key and value
    heads `new_heads` (`[rows, heads * dim]` each, not rotated yet; column slices of the fused
    q/k/v product): rotary embedding (query and key in place), KV write and attention in one
    native call; returns `[rows, q_heads * dim]`, or None (nothing done) where
    `native_decode_rows` says no or no kernel is given."""
    query, key, value = new_heads
    rows = native_decode_rows(meta, query.dtype) if kernel is not None else None
    if kernel is None or rows is None:
        return None
    keys, values = meta.kv_cache.layer(layer)
    context_slots, lengths = rows
    return kernel(
        query, key, value, cos, sin, keys, values, meta.slot_mapping, context_slots, lengths,
        scaling,
    )


def _decode_attention(
    meta: AttentionMetadata,
    layer: int,
    queries: torch.Tensor,
    decode: DecodeRows,
    scaling: float | None,
) -> torch.Tensor:
    """`queries` `[rows, q_heads, dim]` -> `[rows, q_heads, dim]`."""
    kernel = meta.decode_kernel
    head_dim = queries.shape[-1]
    if (
        kernel is not None and head_dim % 16 == 0 and queries.dtype == meta.kv_cache.spec.dtype
    ):
        keys, values = meta.kv_cache.layer(layer)
        slots = decode.context_slots.view(decode.num_rows, decode.max_context)
        scale = scaling if scaling is not None else head_dim**-0.5
        return kernel(queries.contiguous(), keys, values, slots, decode.lengths, scale)
    cache_keys, cache_values = meta.kv_cache.gather_layer(
        layer, decode.context_slots, meta.gather_buffers
    )
    if cache_keys.dtype != queries.dtype:  # replicas keep KV in the model dtype; tests may not
        cache_keys, cache_values = cache_keys.to(queries.dtype), cache_values.to(queries.dtype)
    context_shape = (decode.num_rows, decode.max_context, *cache_keys.shape[1:])
    keys = cache_keys.view(context_shape).transpose(1, 2)  # [rows, kv_heads, ctx, dim]
    values = cache_values.view(context_shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        queries.unsqueeze(2),  # [rows, q_heads, 1, dim]
        keys,
        values,
        attn_mask=decode.mask,
        scale=scaling,
        enable_gqa=True,
    )  # [rows, q_heads, 1, dim]
    return out.reshape(queries.shape)


def _prefill_attention(
    meta: AttentionMetadata,
    layer: int,
    queries: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefill: PrefillRows,
    scaling: float | None,
) -> torch.Tensor:
    """`queries` `[num_tokens, q_heads, dim]` of one sequence -> `[num_tokens, q_heads, dim]`."""
    seq_query = queries.transpose(0, 1).unsqueeze(0)  # [1, q_heads, num_tokens, dim]
    if prefill.context_slots is None:
        end = prefill.start + prefill.num_tokens
        out = F.scaled_dot_product_attention(
            seq_query,
            key[:, :, prefill.start : end],
            value[:, :, prefill.start : end],
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
        )
    else:
        # A chunk after a cached prefix: attend over the whole context from the cache (its own
        # new KV was written there above).
        cache_keys, cache_values = meta.kv_cache.gather_layer(
            layer, prefill.context_slots, meta.gather_buffers
        )
        out = F.scaled_dot_product_attention(
            seq_query,
            cache_keys.transpose(0, 1).unsqueeze(0).to(seq_query.dtype),
            cache_values.transpose(0, 1).unsqueeze(0).to(seq_query.dtype),
            attn_mask=prefill.mask,
            scale=scaling,
            enable_gqa=True,
        )
    return out[0].transpose(0, 1)


def register_paged_attention() -> str:
    """Registers the kernel with transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
