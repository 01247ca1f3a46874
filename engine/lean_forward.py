"""A lean forward pass for the Llama family (Llama, Mistral, Qwen2, Qwen3), on the model's own
weights and modules.

transformers' decoder forward is general: every layer goes through decorators, keyword
plumbing, an attention-interface lookup, output dataclasses and a causal-mask builder that a
paged engine does not need. A decode step of a small model spends more time there than in its
matrix products. `LeanForward` runs the same operations in the same order, with the same
tensors (so the numbers are the same: greedy output stays token-identical to `generate()`),
and nothing else: per layer, RMSNorm, the q/k/v projections (Qwen3's q/k norms), rotary
embedding, the paged attention (`engine.attention`), the output projection, the residual,
RMSNorm and the gated MLP. The projections are whatever the loader installed (native
`SkinnyLinear`s, oneDNN-packed or plain `nn.Linear`), called without `nn.Module`'s hooks.

`lean_forward_for` says whether a model's modules have the expected shape (the loader admits
only the architectures above); where not, the runner keeps transformers' forward and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.attention import AttentionMetadata, paged_attention

logger = logging.getLogger(__name__)

Project = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Norm:
    """An RMSNorm's weight and epsilon (transformers' LlamaRMSNorm, op for op)."""

    weight: torch.Tensor
    eps: float

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.eps)
        return self.weight * hidden.to(input_dtype)


@dataclass(frozen=True)
class _Layer:
    attention: torch.nn.Module
    input_norm: _Norm
    q_proj: Project
    k_proj: Project
    v_proj: Project
    o_proj: Project
    # Qwen3: RMSNorm over each head's query / key.
    q_norm: _Norm | None
    k_norm: _Norm | None
    post_norm: _Norm
    gate_proj: Project
    up_proj: Project
    down_proj: Project
    act: Callable[[torch.Tensor], torch.Tensor]
    head_dim: int
    scaling: float


class LeanForward:
    """Callable like the decoder for `ModelRunner`: packed `[1, N]` ids and positions in,
    `[N, hidden]` last hidden states out."""

    def __init__(self, decoder: Any) -> None:
        self._embed = decoder.embed_tokens
        self._rotary = decoder.rotary_emb
        self._norm = _norm_of(decoder.norm)
        self._layers = [_layer_of(layer) for layer in decoder.layers]

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self._embed(input_ids)  # [1, N, hidden]
        cos, sin = self._rotary(hidden, position_ids=position_ids)
        # [1, 1, N, head_dim]: broadcast over heads, as apply_rotary_pos_emb unsqueezes them.
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer in self._layers:
            hidden = _run_layer(layer, hidden, cos, sin, meta)
        return self._norm(hidden)[0]


def lean_forward_for(model_type: str, model: Any) -> LeanForward | None:
    """A `LeanForward` over `model`'s decoder, or None (logged) when its modules are not the
    Llama-family layout it knows."""
    try:
        return LeanForward(model.get_decoder())
    except (AttributeError, TypeError) as exc:
        logger.warning("no lean forward for this %s model (%s): transformers' forward runs",
                       model_type, exc)
        return None


def _run_layer(
    layer: _Layer,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    residual = hidden
    normed = layer.input_norm(hidden)
    head_shape = (*normed.shape[:-1], -1, layer.head_dim)
    query = layer.q_proj(normed).view(head_shape)
    key = layer.k_proj(normed).view(head_shape)
    if layer.q_norm is not None and layer.k_norm is not None:
        query, key = layer.q_norm(query), layer.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = layer.v_proj(normed).view(head_shape).transpose(1, 2)
    query = (query * cos) + (_rotate_half(query) * sin)
    key = (key * cos) + (_rotate_half(key) * sin)
    attended, _ = paged_attention(
        layer.attention, query, key, value, None, scaling=layer.scaling, pd_attention=meta
    )
    attended = attended.reshape(*normed.shape[:-1], -1).contiguous()
    hidden = residual + layer.o_proj(attended)
    residual = hidden
    normed = layer.post_norm(hidden)
    mlp = layer.down_proj(layer.act(layer.gate_proj(normed)) * layer.up_proj(normed))
    return residual + mlp


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm_of(module: Any) -> _Norm:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps
    return _Norm(module.weight, float(eps))


def _layer_of(layer: Any) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    q_norm = getattr(attention, "q_norm", None)
    k_norm = getattr(attention, "k_norm", None)
    return _Layer(
        attention=attention,
        input_norm=_norm_of(layer.input_layernorm),
        q_proj=attention.q_proj.forward,
        k_proj=attention.k_proj.forward,
        v_proj=attention.v_proj.forward,
        o_proj=attention.o_proj.forward,
        q_norm=_norm_of(q_norm) if q_norm is not None else None,
        k_norm=_norm_of(k_norm) if k_norm is not None else None,
        post_norm=_norm_of(layer.post_attention_layernorm),
        gate_proj=mlp.gate_proj.forward,
        up_proj=mlp.up_proj.forward,
        down_proj=mlp.down_proj.forward,
        act=mlp.act_fn,
        head_dim=int(attention.head_dim),
        scaling=float(attention.scaling),
    )
