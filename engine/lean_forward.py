"""A lean forward pass for the Llama family (Llama, Mistral, Qwen2, Qwen3), on the model's own
weights.

transformers' decoder forward is general: every layer goes through decorators, keyword
plumbing, an attention-interface lookup, output dataclasses and a causal-mask builder that a
paged engine does not need. A decode step of a small model spends more time there than in its
matrix products. `LeanForward` runs the same operations in the same order and rounds where
they round (so greedy output stays token-identical to `generate()`), and nothing else: per
layer, RMSNorm, the q/k/v projections (Qwen3's q/k norms), rotary embedding, the paged
attention (`engine.attention`), the output projection, the residual, RMSNorm and the gated
MLP, on 2-D `[tokens, columns]` tensors.

With the native kernels (`engine.kernels`), q/k/v are one product and gate/up another
(`FusedNativeLinear`: the weights streamed in one pass), and the elementwise operations are one
native call each (`NativeLayerOps`); the MLP's residual add is fused into the next layer's
RMSNorm. A decode-only pass (every row one new token, nobody waiting on each layer's KV) goes
through every layer in one native call (`engine.decode_stack`: the same kernels in the same
order, bit for bit); where the stack does not apply, each decode-only layer's attention is still
one call (rotary, KV write and attention: `decode_only_attention`). Without the native kernels,
the same structure runs on torch's operations (`TorchLayerOps`) and the projections the loader
installed.

`lean_forward_for` says whether a model's modules have the expected shape (the loader admits
only the architectures above); where not, the runner keeps transformers' forward and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from engine.attention import (
    AttentionMetadata,
    DecodeQKVKernel,
    decode_only_attention,
    native_decode_rows,
    paged_attention,
)
from engine.decode_stack import build_decode_stack
from engine.kernels.linear import FusedNativeLinear, NativeLinear
from engine.layer_ops import LayerOps, NativeLayerOps, Norm, TorchLayerOps

logger = logging.getLogger(__name__)

Project = Callable[[torch.Tensor], torch.Tensor]


class _ConcatProjection:
    """Several projections of one input as one `[rows, sum of outputs]` tensor (torch path)."""

    def __init__(self, projections: Sequence[Any]) -> None:
        self._calls = [projection.forward for projection in projections]
        widths = [int(projection.out_features) for projection in projections]
        self.offsets = tuple(sum(widths[:i]) for i in range(len(widths)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([call(x) for call in self._calls], dim=-1)


@dataclass(frozen=True)
class _Layer:
    index: int
    attention: torch.nn.Module
    input_norm: Norm
    # One product for q/k/v, their column offsets in it and widths.
    qkv: Project
    qkv_offsets: tuple[int, ...]
    q_width: int
    kv_width: int
    # Qwen3: RMSNorm over each head's query / key.
    q_norm: Norm | None
    k_norm: Norm | None
    o_proj: Project
    post_norm: Norm
    # One product for gate/up, up's column offset and the MLP width.
    gate_up: Project
    up_offset: int
    mlp_width: int
    down_proj: Project
    head_dim: int
    scaling: float
    # The native products of the layer in call order (their weights, see `weights_in_order`).
    native_weights: tuple[NativeLinear | FusedNativeLinear, ...]


class LeanForward:
    """Callable like the decoder for `ModelRunner`: packed `[1, N]` ids and positions in,
    `[N, hidden]` last hidden states out."""

    def __init__(self, decoder: Any, native: ModuleType | None = None) -> None:
        self._embed = decoder.embed_tokens
        self._rotary = decoder.rotary_emb
        self._norm = _norm_of(decoder.norm)
        self._ops: LayerOps = NativeLayerOps(native) if native is not None else TorchLayerOps()
        self._native = native
        self._decode_qkv: DecodeQKVKernel | None = (
            native.decode_attention_qkv if native is not None else None
        )
        self._layers = [_layer_of(layer) for layer in decoder.layers]
        # The native DecodeStack, built at the first decode-only pass (after the loader moved
        # the weights into their arena); False = the layers do not suit it.
        self._stack: Any = None

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self._embed(input_ids)  # [1, N, hidden]
        cos, sin = self._rotary(hidden, position_ids=position_ids)  # [1, N, head_dim]
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        hidden = hidden[0].contiguous()  # the residual stream, updated in place
        stack = self._decode_stack(meta, hidden.dtype)
        if stack is not None:
            context_slots, lengths = stack[1]
            return stack[0].forward(  # type: ignore[no-any-return]
                hidden, cos, sin, meta.kv_cache.tensor, meta.slot_mapping, context_slots, lengths
            )
        ops = self._ops
        normed = ops.norm(hidden, self._layers[0].input_norm)
        for index, layer in enumerate(self._layers):
            attended = self._attend(layer, normed, cos, sin, meta)
            normed = ops.add_norm(hidden, layer.o_proj(attended), layer.post_norm)
            gate_up = layer.gate_up(normed)
            mlp = layer.down_proj(ops.silu_mul(gate_up, layer.mlp_width, layer.up_offset))
            is_last = index + 1 == len(self._layers)
            next_norm = self._norm if is_last else self._layers[index + 1].input_norm
            normed = ops.add_norm(hidden, mlp, next_norm)
        return normed

    def _decode_stack(
        self, meta: AttentionMetadata, dtype: torch.dtype
    ) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]] | None:
        """The native stack and the rows' contexts when this pass runs through it (a
        decode-only pass on the native kernels), else None."""
        if self._native is None or self._stack is False:
            return None
        rows = native_decode_rows(meta, dtype)
        if rows is None:
            return None
        if self._stack is None:
            self._stack = build_decode_stack(self._native, self._layers, self._norm) or False
            if self._stack is False:
                logger.warning("some layer's products are not native: no native decode stack")
                return None
        return self._stack, rows

    def _attend(
        self,
        layer: _Layer,
        normed: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The layer's attention of the normed input `[N, hidden]` -> `[N, q_width]`: one
        native call for a decode-only pass, else rotary in place and `paged_attention`."""
        ops, head_dim = self._ops, layer.head_dim
        qkv = layer.qkv(normed)  # query, key and value heads at their offsets
        q_at, k_at, v_at = layer.qkv_offsets
        query = qkv[:, q_at : q_at + layer.q_width]
        key = qkv[:, k_at : k_at + layer.kv_width]
        value = qkv[:, v_at : v_at + layer.kv_width]
        if layer.q_norm is not None and layer.k_norm is not None:
            query.copy_(_head_norm(ops, query, layer.q_norm, head_dim))
            key.copy_(_head_norm(ops, key, layer.k_norm, head_dim))
        attended = decode_only_attention(
            meta, layer.index, (query, key, value), cos, sin, layer.scaling, self._decode_qkv
        )
        if attended is not None:
            return attended
        ops.rotary_(query, cos, sin, head_dim)
        ops.rotary_(key, cos, sin, head_dim)
        heads, _ = paged_attention(
            layer.attention, _heads_first(query, head_dim), _heads_first(key, head_dim),
            _heads_first(value, head_dim), None, scaling=layer.scaling, pd_attention=meta,
        )  # [1, N, q_heads, head_dim]
        return heads.reshape(normed.shape[0], layer.q_width).contiguous()


def weights_in_order(lean: LeanForward) -> list[NativeLinear | FusedNativeLinear]:
    """The native products the decoder layers call, in call order (for
    `engine.kernels.weight_arena`)."""
    return [weights for layer in lean._layers for weights in layer.native_weights]


def lean_forward_for(
    model_type: str, model: Any, native: ModuleType | None = None
) -> LeanForward | None:
    """A `LeanForward` over `model`'s decoder (on the native module's operations where given),
    or None (logged) when its modules are not the Llama-family layout it knows."""
    try:
        return LeanForward(model.get_decoder(), native)
    except (AttributeError, TypeError, ValueError) as exc:
        logger.warning("no lean forward for this %s model (%s): transformers' forward runs",
                       model_type, exc)
        return None


def _heads_first(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`[N, heads * head_dim]` -> the attention interface's `[1, heads, N, head_dim]` (a view)."""
    return x.view(x.shape[0], -1, head_dim).transpose(0, 1).unsqueeze(0)


def _head_norm(ops: LayerOps, x: torch.Tensor, norm: Norm, head_dim: int) -> torch.Tensor:
    """RMSNorm over each head of `x` `[N, heads * head_dim]` (a new contiguous tensor)."""
    heads = x.reshape(-1, head_dim).contiguous()
    return ops.norm(heads, norm).view(x.shape[0], -1)


def _norm_of(module: Any) -> Norm:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps
    return Norm(module.weight.detach(), float(eps))


def _fused(projections: Sequence[Any]) -> tuple[Project, tuple[int, ...]]:
    """One product for `projections` of one input: panels concatenated where they are all
    `NativeLinear`s, else their outputs concatenated."""
    if all(isinstance(projection, NativeLinear) for projection in projections):
        fused = FusedNativeLinear(projections)
        return fused, fused.offsets
    concat = _ConcatProjection(projections)
    return concat, concat.offsets


def _project_of(linear: Any) -> Project:
    """A `NativeLinear`'s 2-D product, else the module's forward."""
    if isinstance(linear, NativeLinear):
        return linear.project
    return linear.forward  # type: ignore[no-any-return]


def _layer_of(layer: Any) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"MLP activation {type(mlp.act_fn).__name__}, not SiLU")
    head_dim = int(attention.head_dim)
    q_norm = getattr(attention, "q_norm", None)
    k_norm = getattr(attention, "k_norm", None)
    qkv, qkv_offsets = _fused([attention.q_proj, attention.k_proj, attention.v_proj])
    gate_up, (_, up_offset) = _fused([mlp.gate_proj, mlp.up_proj])
    in_call_order = (qkv, attention.o_proj, gate_up, mlp.down_proj)
    native_weights = tuple(
        weights for weights in in_call_order
        if isinstance(weights, (NativeLinear, FusedNativeLinear))
    )
    return _Layer(
        index=int(attention.layer_idx),
        attention=attention,
        input_norm=_norm_of(layer.input_layernorm),
        qkv=qkv,
        qkv_offsets=qkv_offsets,
        q_width=int(attention.q_proj.out_features),
        kv_width=int(attention.k_proj.out_features),
        q_norm=_norm_of(q_norm) if q_norm is not None else None,
        k_norm=_norm_of(k_norm) if k_norm is not None else None,
        o_proj=_project_of(attention.o_proj),
        post_norm=_norm_of(layer.post_attention_layernorm),
        gate_up=gate_up,
        up_offset=up_offset,
        mlp_width=int(mlp.gate_proj.out_features),
        down_proj=_project_of(mlp.down_proj),
        head_dim=head_dim,
        scaling=float(attention.scaling),
        native_weights=native_weights,
    )
