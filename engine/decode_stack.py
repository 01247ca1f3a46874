"""The native `DecodeStack` (`engine/kernels/decode_stack.cpp`) over a lean forward's layers: a
decode-only pass through every layer in one call, on the same kernels as the op-by-op path.

`build_decode_stack` hands each layer's packed weights (the tensors the `NativeLinear`s read
now: build it after the loader has moved them into their arena), norms and sizes to the native
module; None where a layer's products are not all native.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

import torch

from engine.kernels.linear import FusedNativeLinear, NativeLinear
from engine.layer_ops import Norm

PROJECTION_NAMES = ("qkv", "o_proj", "gate_up", "down")


class StackLayer(Protocol):
    """What the stack reads of one lean-forward layer."""

    @property
    def native_weights(self) -> tuple[NativeLinear | FusedNativeLinear, ...]: ...
    @property
    def qkv_offsets(self) -> tuple[int, ...]: ...
    @property
    def q_width(self) -> int: ...
    @property
    def kv_width(self) -> int: ...
    @property
    def up_offset(self) -> int: ...
    @property
    def mlp_width(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def scaling(self) -> float: ...
    @property
    def input_norm(self) -> Norm: ...
    @property
    def post_norm(self) -> Norm: ...
    @property
    def q_norm(self) -> Norm | None: ...
    @property
    def k_norm(self) -> Norm | None: ...


def build_decode_stack(
    native: ModuleType, layers: Sequence[StackLayer], final_norm: Norm
) -> Any | None:
    """A `DecodeStack` holding `layers` in order, or None when some layer's four products
    (q/k/v, output, gate/up, down) are not all native."""
    if any(len(layer.native_weights) != len(PROJECTION_NAMES) for layer in layers):
        return None
    stack = native.DecodeStack()
    for layer in layers:
        tensors, sizes = _projections(layer.native_weights)
        tensors.update(input_norm=layer.input_norm.weight, post_norm=layer.post_norm.weight)
        q_at, k_at, v_at = layer.qkv_offsets
        sizes.update(
            q_at=q_at, k_at=k_at, v_at=v_at, q_width=layer.q_width, kv_width=layer.kv_width,
            up_offset=layer.up_offset, mlp_width=layer.mlp_width, head_dim=layer.head_dim,
        )
        reals = {
            "input_eps": layer.input_norm.eps, "post_eps": layer.post_norm.eps,
            "scaling": layer.scaling,
        }
        if layer.q_norm is not None and layer.k_norm is not None:
            tensors.update(q_norm=layer.q_norm.weight, k_norm=layer.k_norm.weight)
            reals.update(q_eps=layer.q_norm.eps, k_eps=layer.k_norm.eps)
        stack.add_layer(tensors, sizes, reals)
    stack.set_final_norm(final_norm.weight, final_norm.eps)
    return stack


def _projections(
    weights: Sequence[NativeLinear | FusedNativeLinear],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    tensors: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    for name, product in zip(PROJECTION_NAMES, weights):
        tensors[name] = product.packed
        if product.scales is not None:
            tensors[f"{name}_scales"] = product.scales
        if product.bias is not None:
            tensors[f"{name}_bias"] = product.bias
        if isinstance(product, FusedNativeLinear):
            sizes[f"{name}_columns"] = product.num_columns
        else:
            sizes[f"{name}_columns"] = int(product.out_features)
    return tensors, sizes
