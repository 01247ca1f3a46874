"""`kv_transfer.wire_dtype` through the whole system (tiny random Llama, KV over gRPC): with
"cache" greedy output equals transformers `generate()` token for token. With the lossy
"bfloat16" and "int8" it equals transformers continuing from a prompt KV cache rounded the same
way (the wire format's rounding, written independently in torch here), which shows the decode
replica ran on the converted KV; the first token (sampled by prefill, before any KV moved)
equals `generate()`'s, the reported KV size stays the cache's, and how many whole outputs still
equal `generate()` is recorded, not asserted (run with -s to see it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.client import GenerationClient, GenerationResult, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet

PROMPTS = [
    [5, 17, 42, 99, 7, 3],
    [11, 12],
    [200, 150, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45],
    [64],
    list(range(100, 160)),
    [300, 301, 302],
    [9, 8, 7, 6, 5, 4, 3, 2],
    [250] * 20,
    list(range(20, 220, 3)),
    [77, 78, 79, 80] * 10,
]
MAX_TOKENS = 16
EOS_TOKEN_ID = 0


def through_the_wire(values: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """KV ([..., head_dim] float32) as the decode replica restores it (kvtransfer/README.md)."""
    if wire_dtype == "bfloat16":
        return values.to(torch.bfloat16).to(values.dtype)
    # int8: one scale per head_dim block, absmax / 127; round half to even, clamp to +-127.
    scale = values.abs().amax(dim=-1, keepdim=True) / 127
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(values / divisor).clamp(-127, 127) * scale


@torch.no_grad()
def greedy_from_rounded_kv(model: torch.nn.Module, prompt: list[int], wire_dtype: str
                           ) -> list[int]:
    """Greedy tokens after the prompt, with the prompt's KV rounded as the wire dtype does."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache = out.past_key_values
    for layer in cache.layers:
        layer.keys.copy_(through_the_wire(layer.keys, wire_dtype))
        layer.values.copy_(through_the_wire(layer.values, wire_dtype))
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < MAX_TOKENS and tokens[-1] != EOS_TOKEN_ID:
        out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def references(model: torch.nn.Module) -> list[list[int]]:
    outputs = []
    for prompt in PROMPTS:
        out = model.generate(  # type: ignore[operator]
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=1
        )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


@pytest.fixture(scope="module")
def kv_bytes_per_token(tiny_model_dir: Path) -> int:
    """float32 keys and values of one token, all layers, from the model's own config."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


@pytest.fixture(scope="module", params=["cache", "bfloat16", "int8"])
def wire_service(
    request: pytest.FixtureRequest, ray_cluster: None, tiny_model_dir: Path
) -> Iterator[tuple[str, Service]]:
    # In-band gRPC: the bytes a cross-node hand-off puts on the network.
    kv_transfer = {"transport": "grpc", "side_channel": "none", "wire_dtype": request.param}
    config = make_config(str(tiny_model_dir), kv_transfer=kv_transfer)
    with Service(config) as running:
        yield request.param, running


def generate(address: str, prompt: list[int]) -> GenerationResult:
    with GenerationClient(address, timeout_s=120) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0))


def matched_prefix(tokens: list[int], expected: list[int]) -> int:
    for index, (token, wanted) in enumerate(zip(tokens, expected)):
        if token != wanted:
            return index
    return min(len(tokens), len(expected))


def test_greedy_output_over_each_wire_dtype(
    wire_service: tuple[str, Service],
    model: torch.nn.Module,
    references: list[list[int]],
    kv_bytes_per_token: int,
    record_property: pytest.RecordProperty,
) -> None:
    wire_dtype, service = wire_service
    results = [generate(service.address, prompt) for prompt in PROMPTS]
    for prompt, result, expected in zip(PROMPTS, results, references):
        assert result.final is not None, f"prompt {prompt}: no final message"
        served = result.final.served_by
        assert (served.kv_transport, served.mode) == ("grpc", "disaggregated")
        # The KV moved is reported at its cache size, whatever travelled.
        assert served.kv_bytes == kv_bytes_per_token * len(prompt)
        assert result.token_ids[:1] == expected[:1], f"prompt {prompt}: first token"
    num_equal = sum(r.token_ids == e for r, e in zip(results, references))
    prefixes = [matched_prefix(r.token_ids, e) for r, e in zip(results, references)]
    summary = (f"wire_dtype {wire_dtype}: {num_equal}/{len(PROMPTS)} greedy outputs equal "
               f"transformers; tokens matched before the first difference: {prefixes} "
               f"(of {[len(e) for e in references]})")
    print(summary)
    record_property("wire_dtype_match", summary)
    if wire_dtype == "cache":
        assert num_equal == len(PROMPTS), summary
    else:
        rounded = [greedy_from_rounded_kv(model, prompt, wire_dtype) for prompt in PROMPTS]
        assert [r.token_ids for r in results] == rounded
    assert_quiet(service)
