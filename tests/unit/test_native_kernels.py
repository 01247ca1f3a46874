"""The native panel matmul kernels against torch (fp32 and bf16; rows 1-70, odd sizes, partial
panels, odd K, 1 and 2 threads, a bias; one summation order whatever the batch), fused
products, the one-token attention over the paged cache, and
the fallback: a build that fails is a loud WARNING and torch's kernels under `auto`, a refusal
under `native`; `torch` never builds. Skipped where this CPU lacks the features a kernel
needs (the status test still runs)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from engine.kernels import native
from engine.kernels.linear import (
    FusedNativeLinear,
    NativeLinear,
    kernel_for,
    quantize_int8,
    use_native_linears,
)
from engine.kernels.weight_arena import move_into_arena
from pdserve.errors import ConfigError


@pytest.fixture(scope="module")
def status_f32() -> native.KernelStatus:
    return native.kernel_status("auto", "float32")


@pytest.fixture(scope="module")
def status_bf16() -> native.KernelStatus:
    return native.kernel_status("auto", "bfloat16")


def _needs(status: native.KernelStatus) -> None:
    if not status.native:
        pytest.skip(status.describe())


def _native_linear(status: native.KernelStatus, weight: torch.Tensor) -> NativeLinear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    module = status.module
    return NativeLinear(linear, kernel_for(module, weight.dtype), module.panel_width())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(1, 576, 192), (3, 100, 7), (5, 17, 33), (9, 64, 49), (32, 1536, 576), (70, 64, 100)],
)
def test_fp32_matches_torch(
    status_f32: native.KernelStatus, threads: int, rows: int, k: int, n: int
) -> None:
    _needs(status_f32)
    generator = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=generator)
    w = torch.randn(n, k, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _native_linear(status_f32, w)(x)
    finally:
        torch.set_num_threads(before)
    expected = x.double() @ w.double().T
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * k**0.5)


def test_fp32_depends_on_neither_the_thread_count_nor_the_batch(
    status_f32: native.KernelStatus,
) -> None:
    _needs(status_f32)
    x, linear = torch.randn(13, 576), _native_linear(status_f32, torch.randn(1000, 576))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x)
        torch.set_num_threads(2)
        two = linear(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    # A row's output is the same alone as in a batch (every tile size sums in one order).
    for row in (0, 7, 12):
        assert torch.equal(linear(x[row : row + 1])[0], one[row])


@pytest.mark.parametrize(
    ("rows", "k", "n"), [(1, 576, 192), (4, 40, 9), (9, 1536, 576), (32, 95, 5), (40, 33, 100)]
)
def test_bf16_matches_torch_within_one_rounding(
    status_bf16: native.KernelStatus, rows: int, k: int, n: int
) -> None:
    _needs(status_bf16)
    generator = torch.Generator().manual_seed(rows + k + n)
    x = torch.randn(rows, k, generator=generator).bfloat16()
    w = torch.randn(n, k, generator=generator).bfloat16()
    got = _native_linear(status_bf16, w)(x)
    exact = x.double() @ w.double().T  # bf16 products are exact; only the sum rounds
    assert got.dtype == torch.bfloat16
    # One bf16 rounding of a fp32 sum: within 2^-8 relative, plus the fp32 sum's error.
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-3 * k**0.5)


def test_bf16_output_is_the_fp32_sum_rounded_to_nearest_even(
    status_bf16: native.KernelStatus,
) -> None:
    _needs(status_bf16)
    # Inputs whose products and sums are exact in fp32: the only rounding is the last one.
    x = torch.tensor([[1.0, 2.0**-8, 2.0**-9, 0.0]]).bfloat16()
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    got = _native_linear(status_bf16, w.bfloat16())(x)
    expected = (x.float() @ w.T).bfloat16()  # torch's rounding of the same fp32 sums
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 576, 192), (9, 100, 50), (33, 64, 7)])
def test_int8_weights_multiply_as_their_dequantized_values(
    status_bf16: native.KernelStatus, dtype: torch.dtype, rows: int, k: int, n: int
) -> None:
    _needs(status_bf16)
    generator = torch.Generator().manual_seed(rows * k + n)
    w = torch.randn(n, k, generator=generator)
    w[1] = 0.0  # an all-zero channel keeps a finite scale
    x = torch.randn(rows, k, generator=generator).to(dtype)
    linear = torch.nn.Linear(k, n, bias=False, dtype=dtype)
    linear.weight.data.copy_(w)
    quantized, scales = quantize_int8(linear.weight)
    assert quantized.dtype == torch.int8 and int(quantized.abs().max()) == 127
    dequantized = quantized.double() * scales.double()[:, None]
    # Rounding to the nearest step: at most half a step per weight.
    error = (dequantized - linear.weight.detach().double()).abs().max()
    assert float(error) <= float(scales.max()) / 2 + 1e-6
    module = status_bf16.module
    width = module.panel_width()
    got = NativeLinear(linear, kernel_for(module, dtype, "int8"), width, "int8")(x)
    expected = x.double() @ dequantized.T
    assert got.dtype == dtype and got.shape == (rows, n)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * k**0.5)


def test_native_linear_adds_its_bias_and_keeps_the_leading_shape(
    status_f32: native.KernelStatus,
) -> None:
    _needs(status_f32)
    linear = torch.nn.Linear(64, 50, bias=True)
    module = status_f32.module
    native_linear = NativeLinear(linear, kernel_for(module, torch.float32), module.panel_width())
    with torch.inference_mode():
        x = torch.randn(1, 9, 64)
        torch.testing.assert_close(native_linear(x), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="bfloat16 input for torch.float32 weights"):
        native_linear(x.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linears_equal_each_alone_and_share_their_panels(
    status_bf16: native.KernelStatus, dtype: torch.dtype
) -> None:
    _needs(status_bf16)
    layers = [torch.nn.Linear(64, n, bias=bias, dtype=dtype) for n, bias in
              ((150, True), (50, False), (7, True))]
    kernel = kernel_for(status_bf16.module, dtype)
    width = status_bf16.module.panel_width()
    natives = [NativeLinear(layer, kernel, width) for layer in layers]
    x = torch.randn(5, 64).to(dtype)
    alone = [native_linear(x) for native_linear in natives]
    fused = FusedNativeLinear(natives)
    out = fused(x)
    assert fused.offsets == (0, 2 * width, 3 * width)  # 2 + 1 + 1 panels
    assert out.shape == (5, 4 * width)
    for offset, expected in zip(fused.offsets, alone):
        assert torch.equal(out[:, offset : offset + expected.shape[1]], expected)
    assert all(n.packed.data_ptr() != 0 and n.packed._base is fused.packed for n in natives)
    torch.testing.assert_close(natives[1](x), alone[1], rtol=0, atol=0)


def test_use_native_linears_swaps_every_linear_and_leaves_the_embedding(
    status_f32: native.KernelStatus,
) -> None:
    _needs(status_f32)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10, bias=False)
    )
    model[2].weight = model[0].weight  # tied, as many LMs tie lm_head to the embedding
    ids = torch.tensor([[1, 4, 9]])
    with torch.inference_mode():
        expected = model(ids)
        assert use_native_linears(model, status_f32.module) == 2
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert all(not isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model[0].weight, torch.nn.Parameter)


def test_a_failed_build_falls_back_loudly_under_auto_and_refuses_under_native(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the build folder should go")
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(blocker))
    monkeypatch.setattr(native, "_loaded", None)  # force a fresh build into the blocked cache
    caplog.set_level(logging.WARNING, logger="engine.kernels.native")
    status = native.kernel_status("auto", "float32")
    assert not status.native
    assert status.describe().startswith("torch (the build failed: ")
    assert "native kernels NOT in use" in caplog.text
    with pytest.raises(ConfigError, match="model.kernels is native, but the build failed"):
        native.kernel_status("native", "float32")


def test_torch_mode_never_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise AssertionError("built although model.kernels is torch")

    monkeypatch.setattr(native, "_load_module", fail)
    status = native.kernel_status("torch", "bfloat16")
    assert status.describe() == "torch (model.kernels is torch)"


def _reference_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
    lengths: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Each row alone, in float64: softmax(q K^T * scale) V over its own context."""
    rows, q_heads, _ = query.shape
    group = q_heads // keys.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for row in range(rows):
        context = slots[row, : lengths[row]]
        k = keys[context].double().repeat_interleave(group, dim=1)  # [ctx, q_heads, dim]
        v = values[context].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", query[row].double(), k) * scale
        out[row] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_decode_attention_reads_the_paged_cache_in_place(
    status_f32: native.KernelStatus, dtype: torch.dtype, q_heads: int, kv_heads: int,
    head_dim: int,
) -> None:
    _needs(status_f32)
    generator = torch.Generator().manual_seed(q_heads * head_dim)
    num_slots, lengths = 300, torch.tensor([1, 37, 200, 5])
    keys = torch.randn(num_slots, kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(num_slots, kv_heads, head_dim, generator=generator).to(dtype)
    query = torch.randn(len(lengths), q_heads, head_dim, generator=generator).to(dtype)
    # Scattered slots, padded past each length with a slot that must not be read.
    slots = torch.randint(0, num_slots - 1, (4, 200), generator=generator)
    slots = torch.where(torch.arange(200) < lengths[:, None], slots, num_slots - 1)
    keys[num_slots - 1] = 1e4  # would dominate any row that read it
    scale = head_dim**-0.5
    got = status_f32.module.decode_attention(query, keys, values, slots, lengths, scale)
    expected = _reference_attention(query, keys, values, slots, lengths, scale)
    assert got.dtype == dtype and got.shape == query.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_decode_attention_refuses_bad_shapes(status_f32: native.KernelStatus) -> None:
    _needs(status_f32)
    keys = torch.randn(10, 2, 24)  # head_dim not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        status_f32.module.decode_attention(
            torch.randn(1, 4, 24), keys, keys, torch.zeros(1, 3, dtype=torch.long),
            torch.tensor([3]), 0.2,
        )
    keys = torch.randn(10, 2, 16)
    with pytest.raises(RuntimeError, match="lengths must be within"):
        status_f32.module.decode_attention(
            torch.randn(1, 4, 16), keys, keys, torch.zeros(1, 3, dtype=torch.long),
            torch.tensor([4]), 0.2,
        )


def test_a_build_lock_left_by_a_dead_builder_is_dropped_a_fresh_one_kept(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("")
    native._drop_stale_lock(tmp_path)
    assert lock.exists(), "a build may be running"
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    native._drop_stale_lock(tmp_path)
    assert not lock.exists()


def test_weights_moved_into_one_arena_compute_the_same(status_bf16: native.KernelStatus) -> None:
    _needs(status_bf16)
    kernel = kernel_for(status_bf16.module, torch.float32)
    width = status_bf16.module.panel_width()
    layers = [torch.nn.Linear(64, n) for n in (150, 50, 7, 64)]
    natives = [NativeLinear(layer, kernel, width) for layer in layers]
    fused = FusedNativeLinear(natives[:3])
    x = torch.randn(3, 64)
    before = [fused(x), natives[3](x), natives[1](x)]
    moved = move_into_arena([fused, natives[3]])
    assert moved == (4 + 1) * width * 64 * 4
    after = [fused(x), natives[3](x), natives[1](x)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    storages = {n.packed.untyped_storage().data_ptr() for n in [*natives, fused]}
    assert len(storages) == 1, "every weight, fused members included, lives in the arena"
    with pytest.raises(ValueError, match="one dtype"):
        bf16 = NativeLinear(torch.nn.Linear(64, 8, dtype=torch.bfloat16),
                            kernel_for(status_bf16.module, torch.bfloat16), width)
        move_into_arena([natives[3], bf16])
