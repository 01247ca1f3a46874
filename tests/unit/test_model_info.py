"""`ReplicaEngine.model_info()`: the tokenizer's chat template and named special tokens reach
the router, through the control-message codec."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.model_loader import chat_template_of, special_tokens_of
from engine.replica_engine import build_replica_engine
from pdserve.messages import ModelInfo, NamedToken, decode, encode
from tests.factories.config import make_config
from tests.factories.model import build_tiny_model_dir

TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TINY_SPECIAL_TOKENS = [NamedToken("eos_token", "<|endoftext|>"), NamedToken("pad_token", "<|pad|>")]


def model_info_of(model_dir: Path) -> ModelInfo:
    config = make_config(str(model_dir), prefill={"kv_cache": {"memory_mb": 1}})
    return build_replica_engine(config.model, config.prefill.kv_cache, 1).model_info()


def test_model_info_carries_the_chat_template_and_special_tokens(tmp_path: Path) -> None:
    info = model_info_of(build_tiny_model_dir(tmp_path, chat_template=TEMPLATE))
    assert info.chat_template == TEMPLATE
    assert info.special_tokens == TINY_SPECIAL_TOKENS
    assert decode(ModelInfo, encode(info)) == info


def test_a_model_without_a_chat_template_reports_an_empty_one(tmp_path: Path) -> None:
    info = model_info_of(build_tiny_model_dir(tmp_path))
    assert info.chat_template == ""
    assert info.special_tokens == TINY_SPECIAL_TOKENS
    assert decode(ModelInfo, encode(info)) == info


def test_of_several_named_templates_default_is_served_and_the_others_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    templates = {"default": TEMPLATE, "tool_use": "{{ tools }}", "rag": "{{ documents }}"}
    with caplog.at_level(logging.WARNING, logger="engine.model_loader"):
        info = model_info_of(build_tiny_model_dir(tmp_path, chat_template=templates))
    assert info.chat_template == TEMPLATE
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("rag, tool_use" in message for message in warnings), warnings


def test_named_templates_without_a_default_give_none(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = SimpleNamespace(chat_template={"tool_use": "{{ tools }}"})
    with caplog.at_level(logging.WARNING, logger="engine.model_loader"):
        assert chat_template_of(tokenizer, "some/model") == ""
    assert "tool_use" in caplog.text


def test_special_tokens_leave_out_lists_and_unset_names() -> None:
    tokenizer = SimpleNamespace(
        special_tokens_map={
            "bos_token": "<s>",
            "unk_token": None,
            "additional_special_tokens": ["<a>", "<b>"],
        }
    )
    assert special_tokens_of(tokenizer) == {"bos_token": "<s>"}
