"""Fixtures of the chat template tests: the embedded SmolLM2 tokenizer as transformers has it
and as the router has it (`tokenizers` alone, from the JSON the replicas ship)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.embedded import resolve_model_source


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerBase:
    folder = resolve_model_source("embedded:smollm2-135m-instruct", None)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def router_tokenizer(hf_tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """The tokenizer as the router has it: `tokenizers` alone, from the JSON replicas ship."""
    return Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
