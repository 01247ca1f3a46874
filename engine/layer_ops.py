"""The elementwise operations of a Llama-family layer, for `engine.lean_forward`: on torch's
operations (`TorchLayerOps`, transformers' own arithmetic op for op) or on the native module
(`NativeLayerOps`, `engine/kernels/layer_ops.cpp`: one call per operation, rounded where torch
rounds).

Tensors are 2-D `[tokens, columns]`; a projection's outputs may be column slices of a fused
product (rows strided, columns contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch


@dataclass(frozen=True)
class Norm:
    """An RMSNorm's weight and epsilon (transformers' LlamaRMSNorm)."""

    weight: torch.Tensor
    eps: float


class LayerOps(Protocol):
    """What the lean forward asks of its elementwise operations."""

    def norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        """RMSNorm of each row of contiguous `x`."""

    def add_norm(self, residual: torch.Tensor, addend: torch.Tensor, norm: Norm) -> torch.Tensor:
        """`residual += addend` (in place, rounded to its dtype), then RMSNorm of the sum."""

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
        """Rotary embedding of each head of `x` `[tokens, heads * head_dim]`, in place;
        `cos`/`sin` `[tokens, head_dim]`."""

    def silu_mul(self, gate_up: torch.Tensor, width: int, up_offset: int) -> torch.Tensor:
        """SiLU(gate) * up of columns `[0, width)` and `[up_offset, up_offset + width)`."""


class TorchLayerOps:
    """transformers' arithmetic on torch's operations (where the native module is not in use)."""

    def norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        input_dtype = x.dtype
        hidden = x.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + norm.eps)
        return norm.weight * hidden.to(input_dtype)

    def add_norm(self, residual: torch.Tensor, addend: torch.Tensor, norm: Norm) -> torch.Tensor:
        residual.add_(addend)
        return self.norm(residual, norm)

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
        heads = x.view(x.shape[0], -1, head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        heads.copy_((heads * cos) + (_rotate_half(heads) * sin))

    def silu_mul(self, gate_up: torch.Tensor, width: int, up_offset: int) -> torch.Tensor:
        gate, up = gate_up[:, :width], gate_up[:, up_offset : up_offset + width]
        return torch.nn.functional.silu(gate) * up


class NativeLayerOps:
    """The same operations on the native module's fused kernels."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        return self._module.rms_norm(x, norm.weight, norm.eps)  # type: ignore[no-any-return]

    def add_norm(self, residual: torch.Tensor, addend: torch.Tensor, norm: Norm) -> torch.Tensor:
        return self._module.add_rms_norm_(  # type: ignore[no-any-return]
            residual, addend.contiguous(), norm.weight, norm.eps
        )

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> None:
        self._module.rotary_(x, head_dim, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor, width: int, up_offset: int) -> torch.Tensor:
        return self._module.silu_mul(gate_up, width, up_offset)  # type: ignore[no-any-return]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
