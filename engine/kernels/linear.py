"""`nn.Linear` for serving on the native panel kernels (`panel_gemm.cpp`, `vnni_gemm.cpp`).

`pack_weight` lays a `[N, K]` weight out once, at load, as the kernel reads it: panels of
`panel_width` output channels with k outermost (fp32 and int8 `[panels, K, width]`, bf16
`[panels, ceil(K / 2), width, 2]`, zero-padded; `pack_weight_vnni`: w8a8's int8 as
`[panels, ceil(K / 4), width, 4]` bytes of w + 128), so that every product streams each panel
from start to end. `NativeLinear` holds only the packed weight (the row-major one is freed,
except where the input embedding shares it) and serves every input, a decode step's few rows
and a prefill's thousands alike, on the same kernel: one summation order, whatever the batch.
The model's own modules call it as they called the `nn.Linear` it replaced. Inference only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import torch

# (x [M, K] contiguous, packed weight, int8 scales or None, N) -> y [M, N]
Kernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", int], torch.Tensor]
# Largest int8 magnitude: symmetric, so -127..127 (no -128).
INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 with one scale per output channel: `q = round(w / scale)`,
    `scale = max |w| of the channel / 127` (1 for an all-zero channel). Returns int8 `[N, K]`
    and fp32 scales `[N]`; `q * scale` is the weight the kernel multiplies by."""
    wide = weight.detach().float()
    scales = wide.abs().amax(dim=1) / INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantized = torch.round(wide / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scales


def pack_weight_vnni(quantized: torch.Tensor, width: int) -> torch.Tensor:
    """int8 `quantized` `[N, K]` as the w8a8 kernel reads it: uint8 `[panels, ceil(K / 4),
    width, 4]` holding `q + 128` (the VNNI instruction multiplies unsigned by signed bytes);
    padding holds 128 (a zero weight)."""
    num_outputs, num_inputs = quantized.shape
    num_panels, num_quads = -(-num_outputs // width), -(-num_inputs // 4)
    padded = torch.zeros(num_panels * width, num_quads * 4, dtype=torch.int16)
    padded[:num_outputs, :num_inputs] = quantized
    biased = (padded + 128).to(torch.uint8)
    return biased.view(num_panels, width, num_quads, 4).transpose(1, 2).contiguous()


def pack_weight(weight: torch.Tensor, width: int) -> torch.Tensor:
    """`weight` `[N, K]` in the panel layout of its dtype (see the module docstring)."""
    num_outputs, num_inputs = weight.shape
    num_panels = -(-num_outputs // width)
    pairs = weight.dtype == torch.bfloat16
    padded_inputs = num_inputs + (num_inputs % 2 if pairs else 0)
    padded = weight.new_zeros(num_panels * width, padded_inputs)
    padded[:num_outputs, :num_inputs] = weight
    if pairs:  # [panels, width, K/2, 2] -> [panels, K/2, width, 2]
        return padded.view(num_panels, width, padded_inputs // 2, 2).transpose(1, 2).contiguous()
    return padded.view(num_panels, width, padded_inputs).transpose(1, 2).contiguous()


class NativeLinear(torch.nn.Module):
    """An `nn.Linear` on the native kernel: its weight packed in panels (`quantization`: int8
    with per-channel scales for `int8` and `w8a8`), inputs and outputs in the weight's original
    dtype."""

    packed: torch.Tensor

    def __init__(
        self, linear: torch.nn.Linear, kernel: Kernel, width: int, quantization: str = "none"
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = linear.weight.dtype
        weight = linear.weight.detach()
        self.scales: torch.Tensor | None = None
        if quantization in ("int8", "w8a8"):
            weight, scales = quantize_int8(weight)
            self.scales = scales.new_ones(-(-self.out_features // width) * width)
            self.scales[: self.out_features] = scales
        packed = pack_weight_vnni(weight, width) if quantization == "w8a8" else pack_weight(
            weight, width
        )
        self.register_buffer("packed", packed)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self._kernel: Kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"NativeLinear: {x.dtype} input for {self.dtype} weights")
        num_rows = x.numel() // self.in_features
        out = self.project(x.reshape(num_rows, self.in_features).contiguous())
        return out.view(*x.shape[:-1], self.out_features)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[rows, in_features]`, contiguous and of the weight's dtype (the kernel checks)
        -> `[rows, out_features]`: `forward` without its reshaping, for callers that already
        hold 2-D rows."""
        out = self._kernel(x, self.packed, self.scales, self.out_features)
        if self.bias is not None:
            out += self.bias
        return out

    def move_packed(self, moved: torch.Tensor) -> None:
        """Reads the packed weight from `moved` (an equal copy) from now on."""
        self.packed = moved


class FusedNativeLinear:
    """Several `NativeLinear`s of one input (q/k/v, gate/up) as one product: their panels
    concatenated, so one call streams all the weights. Each module's `packed` becomes a view of
    the fused tensor (no second copy). Output `[rows, num_columns]`: module i's outputs are the
    columns `[offsets[i], offsets[i] + out_features)` (each starts on a panel boundary; the
    columns between are the zero padding of the panel before)."""

    def __init__(self, linears: Sequence[NativeLinear]) -> None:
        first = linears[0]
        if any(
            linear.in_features != first.in_features or linear.dtype != first.dtype
            or linear.packed.dtype != first.packed.dtype
            or (linear.scales is None) != (first.scales is None)
            for linear in linears
        ):
            raise ValueError("fused linears need one input size, dtype and weight format")
        width = int(first.packed.shape[2])
        self.packed = torch.cat([linear.packed for linear in linears])
        self.scales: torch.Tensor | None = None
        if first.scales is not None:
            self.scales = torch.cat([linear.scales for linear in linears])  # type: ignore[misc]
        self._kernel: Kernel = first._kernel
        self._members = list(linears)
        self._panel_counts = [int(linear.packed.shape[0]) for linear in linears]
        self.move_packed(self.packed)
        starts = [sum(self._panel_counts[:i]) for i in range(len(linears))]
        self.offsets = tuple(start * width for start in starts)
        self.num_columns = sum(self._panel_counts) * width
        self.bias: torch.Tensor | None = None
        if any(linear.bias is not None for linear in linears):
            self.bias = torch.zeros(self.num_columns, dtype=first.dtype)
            for offset, linear in zip(self.offsets, linears):
                if linear.bias is not None:
                    self.bias[offset : offset + linear.out_features] = linear.bias

    def move_packed(self, moved: torch.Tensor) -> None:
        """Reads the fused weight from `moved` (an equal copy) from now on; each member
        module's weight becomes its slice of it."""
        self.packed = moved
        start = 0
        for linear, num_panels in zip(self._members, self._panel_counts):
            linear.move_packed(moved[start : start + num_panels])
            start += num_panels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[rows, in_features]` (contiguous) -> `[rows, num_columns]`."""
        out = self._kernel(x, self.packed, self.scales, self.num_columns)
        if self.bias is not None:
            out += self.bias
        return out


def kernel_for(module: ModuleType, dtype: torch.dtype, quantization: str = "none") -> Kernel:
    """The native module's kernel for activations of `dtype` and weights of `quantization`."""
    if quantization == "int8":
        return module.panel_linear_int8  # type: ignore[no-any-return]
    if quantization == "w8a8":
        return module.panel_linear_w8a8  # type: ignore[no-any-return]
    if quantization != "none":
        raise ValueError(f"no native kernel for {quantization} weights")
    if dtype == torch.float32:
        f32 = module.panel_linear_f32
        return lambda x, packed, _, n: f32(x, packed, n)  # type: ignore[no-any-return]
    if dtype == torch.bfloat16:
        bf16 = module.panel_linear_bf16
        return lambda x, packed, _, n: bf16(x, packed, n)  # type: ignore[no-any-return]
    raise ValueError(f"no native kernel for {dtype}")


def use_native_linears(
    model: torch.nn.Module, module: ModuleType, quantization: str = "none"
) -> int:
    """Swaps every `nn.Linear` of `model` for a `NativeLinear` on `module`'s kernel of its
    dtype (int8 weights when `quantization` is `int8` or `w8a8`). A tied output embedding gets
    a packed copy; the input embedding keeps the row-major weight. Returns how many."""
    width = int(module.panel_width())
    num_swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                kernel = kernel_for(module, child.weight.dtype, quantization)
                setattr(parent, name, NativeLinear(child, kernel, width, quantization))
                num_swapped += 1
    return num_swapped
