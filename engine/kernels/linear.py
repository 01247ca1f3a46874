"""`nn.Linear` for serving: decode-sized inputs go to the native skinny kernels.

A decode step feeds each linear layer a few rows (one per running sequence); a prefill pass
feeds it hundreds. `SkinnyLinear` sends inputs of at most `max_rows` rows to the native kernel
of its dtype (`engine.kernels.native`) and larger ones to torch's `F.linear`, whose blocked
kernels suit them. The model's own modules call it as they called the `nn.Linear` it replaced.
Inference only (no autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

# Rows up to which the native kernel serves (a decode batch of up to this many sequences).
MAX_NATIVE_ROWS = 32

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SkinnyLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, kernel: Kernel, max_rows: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self._kernel = kernel
        self._max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_rows = x.numel() // self.in_features
        if num_rows > self._max_rows or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        out = self._kernel(x.reshape(num_rows, self.in_features).contiguous(), self.weight)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def kernel_for(module: ModuleType, dtype: torch.dtype) -> Kernel:
    """The native module's kernel for weights of `dtype`."""
    if dtype == torch.float32:
        return module.skinny_linear_f32  # type: ignore[no-any-return]
    if dtype == torch.bfloat16:
        return module.skinny_linear_bf16  # type: ignore[no-any-return]
    raise ValueError(f"no native kernel for {dtype}")


def use_skinny_linears(
    model: torch.nn.Module, module: ModuleType, max_rows: int = MAX_NATIVE_ROWS
) -> int:
    """Swaps every `nn.Linear` of `model` for a `SkinnyLinear` on `module`'s kernel of its
    dtype (a tied output embedding keeps sharing its weight). Returns how many."""
    num_swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                kernel = kernel_for(module, child.weight.dtype)
                setattr(parent, name, SkinnyLinear(child, kernel, max_rows))
                num_swapped += 1
    return num_swapped
