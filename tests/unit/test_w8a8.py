"""`model.quantization: w8a8` (int8 weights with per-channel scales, activations quantized to
int8 per row at run time, products on AVX512-VNNI): the kernel equals a torch reference of the
same arithmetic bit for bit (fp32 and bf16, partial panels, K not a multiple of 4, an all-zero
row, any thread count, a row alone or in a batch); greedy output through the engine equals
transformers' `generate()` with that reference in place of every linear layer, token for
token (fp32 activations); without the native kernels it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.kernels import native
from engine.kernels.linear import NativeLinear, kernel_for, quantize_int8
from engine.model_loader import load_model
from pdserve.config import ModelConfig
from pdserve.errors import ConfigError
from tests.factories.model import build_tiny_model_dir
from tests.unit.test_model_runner import PROMPTS, generate_batched, greedy_generate, make_runner


@pytest.fixture(scope="module")
def module() -> object:
    status = native.kernel_status("auto", "bfloat16")
    if not status.native or "avx512vnni" not in status.features.split(","):
        pytest.skip(f"no VNNI kernel here: {status.describe()}")
    return status.module


class ReferenceW8A8(torch.nn.Module):
    """What the w8a8 kernel computes, in torch: each row of x quantized to int8 (scale
    max |x| / 127, ties to even), the exact integer product with the int8 weight, times the
    row's scale, times the channel's, in fp32; the bias added in x's dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.quantized, self.scales = quantize_int8(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        row_scale = wide.abs().amax(dim=-1, keepdim=True) / 127
        levels = torch.where(row_scale > 0, wide / row_scale, torch.zeros_like(wide))
        q = torch.round(levels).clamp(-127, 127)
        exact = q.double() @ self.quantized.double().T  # integers: exact in fp64
        y = ((exact.float() * row_scale) * self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _linear(k: int, n: int, dtype: torch.dtype, seed: int, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    return linear.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "k", "n"), [(1, 576, 192), (3, 101, 7), (5, 64, 200), (33, 130, 96)]
)
def test_the_kernel_equals_its_reference_bit_for_bit(
    module, dtype: torch.dtype, rows: int, k: int, n: int
) -> None:
    linear = _linear(k, n, dtype, seed=rows + k + n, bias=True)
    reference = ReferenceW8A8(linear)
    native_linear = NativeLinear(
        linear, kernel_for(module, dtype, "w8a8"), module.panel_width(), "w8a8"
    )
    x = (torch.randn(rows, k) * 3).to(dtype)
    x[rows // 2] = 0  # an all-zero row: scale 0, output the bias alone
    assert native_linear.packed.dtype == torch.uint8
    assert torch.equal(native_linear(x), reference(x))


def test_a_row_gets_the_same_output_alone_in_a_batch_and_on_any_threads(module) -> None:
    linear = _linear(576, 1536, torch.bfloat16, seed=7)
    native_linear = NativeLinear(
        linear, kernel_for(module, torch.bfloat16, "w8a8"), module.panel_width(), "w8a8"
    )
    batch = torch.randn(9, 576).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = native_linear(batch[4:5])
        torch.set_num_threads(2)
        together = native_linear(batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], together[4])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_output_equals_generate_on_the_reference(
    module, tmp_path: Path, model_type: str
) -> None:
    """fp32 activations, as the weight-only int8 oracle: in bf16 the engine's attention and
    transformers' agree to the last bit only mostly, and a last-bit difference in an activation
    can move its int8 level (the products themselves are tested bit for bit above)."""
    path = build_tiny_model_dir(tmp_path, model_type)
    loaded = load_model(ModelConfig(source=str(path), dtype="float32", quantization="w8a8"))
    assert "w8a8" in loaded.kernels
    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for parent in list(oracle.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, ReferenceW8A8(child))
    runner, blocks = make_runner(loaded)
    outputs = generate_batched(runner, blocks, PROMPTS)
    for prompt, output in zip(PROMPTS, outputs):
        assert output == greedy_generate(oracle, prompt), f"prompt {prompt}"


def test_w8a8_without_the_native_kernels_is_refused(tmp_path: Path) -> None:
    path = build_tiny_model_dir(tmp_path, "llama")
    config = ModelConfig(source=str(path), kernels="torch", quantization="w8a8")
    with pytest.raises(ConfigError, match="w8a8 needs the native kernels"):
        load_model(config)
