"""Tiny random transformers models saved as ordinary model folders, built in about a second.

Weights are drawn with a large init range so next-token distributions are peaked: greedy
decoding then has clear winners, and token-for-token comparisons against `generate()` test
pdserve's numerics rather than floating-point tie-breaking.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from tests.factories.tokenizer import train_byte_level_tokenizer

EOS_TOKEN_ID = 0  # `<|endoftext|>` in the factory tokenizer


def build_tiny_model_dir(
    path: Path,
    model_type: str = "llama",
    num_layers: int = 3,
    seed: int = 0,
    chat_template: str | dict[str, str] | None = None,
) -> Path:
    """Writes config, random weights and a byte-level tokenizer (with `chat_template`, if
    given: one Jinja template or several by name) into `path`."""
    tokenizer = train_byte_level_tokenizer()
    common = dict(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.25,
        eos_token_id=EOS_TOKEN_ID,
        bos_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=False,
    )
    if model_type == "llama":
        config = LlamaConfig(**common)
    elif model_type == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    elif model_type == "qwen3":  # per-head q/k norms; head_dim set apart from hidden / heads
        config = Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    else:
        raise ValueError(f"unknown tiny model type {model_type}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    saved = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    saved.chat_template = chat_template
    saved.save_pretrained(path)
    return path
