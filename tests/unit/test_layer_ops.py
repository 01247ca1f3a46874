"""The native per-layer operations (`engine/kernels/layer_ops.cpp`) against transformers'
arithmetic on torch (`TorchLayerOps`), in fp32 and bf16: rotary embedding bit for bit (strided
rows too), RMSNorm and SiLU * up within the last bit of their differing sums and exp, the
residual add in place. Skipped where the native kernels do not build or the CPU lacks them."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import native
from engine.layer_ops import NativeLayerOps, Norm, TorchLayerOps

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def native_ops() -> NativeLayerOps:
    status = native.kernel_status("auto", "bfloat16")
    if not status.native:
        pytest.skip(status.describe())
    return NativeLayerOps(status.module)


def _close(dtype: torch.dtype) -> dict[str, float]:
    # One unit in the last place of the dtype, relative.
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7
    return {"rtol": 2 * ulp, "atol": 2 * ulp}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_matches_torch(native_ops: NativeLayerOps, dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=generator) * 3).to(dtype)
    norm = Norm(torch.rand(576, generator=generator).to(dtype) + 0.5, 1e-5)
    got, expected = native_ops.norm(x, norm), TorchLayerOps().norm(x, norm)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, **_close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_norm_adds_in_place_then_normalizes(
    native_ops: NativeLayerOps, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(7)
    residual = torch.randn(5, 64, generator=generator).to(dtype)
    addend = torch.randn(5, 64, generator=generator).to(dtype)
    norm = Norm(torch.rand(64, generator=generator).to(dtype), 1e-6)
    theirs = residual.clone()
    expected = TorchLayerOps().add_norm(theirs, addend, norm)
    got = native_ops.add_norm(residual, addend, norm)
    assert torch.equal(residual, theirs), "the sum is rounded as torch rounds it"
    torch.testing.assert_close(got, expected, **_close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_bit_identical_on_strided_rows(
    native_ops: NativeLayerOps, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(3)
    rows, heads, head_dim = 6, 3, 64
    fused = torch.randn(rows, 500, generator=generator).to(dtype)  # q/k/v columns of a product
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 20
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    theirs = fused.clone()
    TorchLayerOps().rotary_(theirs[:, 100 : 100 + heads * head_dim], cos, sin, head_dim)
    native_ops.rotary_(fused[:, 100 : 100 + heads * head_dim], cos, sin, head_dim)
    assert torch.equal(fused, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(native_ops: NativeLayerOps, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(4, 2 * 96 + 20, generator=generator) * 4).to(dtype)
    got = native_ops.silu_mul(gate_up, 90, 96)
    expected = TorchLayerOps().silu_mul(gate_up, 90, 96)
    assert got.shape == (4, 90)
    torch.testing.assert_close(got, expected, **_close(dtype))


def test_bad_shapes_are_refused(native_ops: NativeLayerOps) -> None:
    with pytest.raises(RuntimeError, match="silu_mul"):
        native_ops.silu_mul(torch.randn(2, 10), 6, 6)
    with pytest.raises(RuntimeError, match="rotary_"):
        native_ops.rotary_(torch.randn(2, 10), torch.randn(2, 4), torch.randn(2, 4), 4)
    with pytest.raises(RuntimeError, match="add_rms_norm_"):
        native_ops.add_norm(torch.randn(2, 8), torch.randn(3, 8), Norm(torch.ones(8), 1e-6))
