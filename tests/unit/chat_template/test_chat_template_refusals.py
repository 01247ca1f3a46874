"""ChatTemplate's refusals: reserved or non-JSON template kwargs, malformed messages, sandbox
escapes and template errors, each a typed `InvalidArgument` where transformers refuses; a model
without a (compilable) template refuses chat; the module stays torch-free."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from pdserve.errors import InvalidArgument
from pdserve.messages import ModelInfo, NamedToken
from router.chat_template import ChatTemplate
from tests.factories.chat_templates import CONVERSATIONS, Messages, ours


@pytest.mark.parametrize("name", ["messages", "add_generation_prompt", "tools", "documents"])
def test_reserved_template_kwargs_are_refused(
    hf_tokenizer: PreTrainedTokenizerBase, name: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ours(hf_tokenizer).render(CONVERSATIONS["single_user"], template_kwargs={name: []})
    assert refused.value.field == "chat_template_kwargs"
    assert name in str(refused.value)


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, b"bytes", {1: "non-string key"}, [print], nested_lists(40)]
)
def test_non_json_template_kwargs_are_refused(
    hf_tokenizer: PreTrainedTokenizerBase, value: Any
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ours(hf_tokenizer).render(CONVERSATIONS["single_user"], template_kwargs={"x": value})
    assert refused.value.field == "chat_template_kwargs"


@pytest.mark.parametrize("messages", [[], ["not a dict"], [{"role": "user", "content": b"x"}]])
def test_malformed_messages_are_refused(
    hf_tokenizer: PreTrainedTokenizerBase, messages: Messages
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        ours(hf_tokenizer).render(messages)
    assert refused.value.field == "messages"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'system', 'content': 'x'}) }}",
        "{% set xs = [] %}{{ xs.append(1) }}",
        "{{ messages[0].update({'role': 'system'}) }}",
        "{{ messages[0].content.__class__.__base__ }}",
        "{% set ns = namespace(_hidden=1) %}",
        "{% set ns = namespace(a=1) %}{% set ns.__class__ = 1 %}",
    ],
)
def test_sandbox_refuses_like_transformers(
    hf_tokenizer: PreTrainedTokenizerBase, template: str
) -> None:
    messages = CONVERSATIONS["single_user"]
    with pytest.raises(SecurityError) as theirs:
        hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    with pytest.raises(InvalidArgument) as refused:
        ours(hf_tokenizer, template).render(messages)
    assert refused.value.field == "messages"
    if "namespace" not in template:  # the namespace refusal is worded by each implementation
        assert theirs.value.message in str(refused.value)
    assert messages == [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{{ messages[0].__dict__ }}",
    ],
)
def test_sandbox_renders_unsafe_attributes_as_undefined_like_transformers(
    hf_tokenizer: PreTrainedTokenizerBase, template: str
) -> None:
    # Jinja turns an unsafe attribute into an undefined value that prints as "", so these
    # render (to nothing) instead of failing, in transformers too.
    messages = CONVERSATIONS["single_user"]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours(hf_tokenizer, template).render(messages) == expected == ""


def test_template_runtime_errors_are_invalid_argument(
    hf_tokenizer: PreTrainedTokenizerBase,
) -> None:
    for template in ["{{ 1 / 0 }}", "{{ range(10**9) | length }}", "{{ undefined_var.attr }}"]:
        with pytest.raises(InvalidArgument) as refused:
            ours(hf_tokenizer, template).render(CONVERSATIONS["single_user"])
        assert refused.value.field == "messages"
        assert refused.value.message.startswith("messages: the chat template failed: ")


def test_model_without_template_refuses_chat() -> None:
    template = ChatTemplate("", {"eos_token": "</s>"})
    assert not template.available
    with pytest.raises(InvalidArgument) as refused:
        template.render(CONVERSATIONS["single_user"])
    assert refused.value.field == "messages"
    assert "no chat template" in str(refused.value)


def test_template_that_does_not_compile_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="router.chat_template"):
        template = ChatTemplate("{% for m in messages %}{{ m.content }}", {})
        unknown_filter = ChatTemplate("{{ messages | no_such_filter }}", {})
    assert not template.available and not unknown_filter.available
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("chat requests will be refused" in record.getMessage() for record in warnings)
    caplog.clear()
    with pytest.raises(InvalidArgument) as refused:
        template.render(CONVERSATIONS["single_user"])
    assert refused.value.field == "messages"
    assert "does not compile" in str(refused.value) and "endfor" in str(refused.value)
    assert not caplog.records


def test_from_model_info(
    hf_tokenizer: PreTrainedTokenizerBase, router_tokenizer: Tokenizer
) -> None:
    info = ModelInfo(
        model="smollm2",
        dtype="float32",
        model_type="llama",
        vocab_size=router_tokenizer.get_vocab_size(),
        max_context_tokens=2048,
        eos_token_ids=[2],
        tokenizer_json="{}",
        kv_fingerprint="test",
        chat_template=hf_tokenizer.chat_template,
        special_tokens=[
            NamedToken(name, text) for name, text in hf_tokenizer.special_tokens_map.items()
        ],
    )
    template = ChatTemplate.from_model_info(info)
    messages = CONVERSATIONS["multi_turn"]
    assert template.available
    assert template.render(messages) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    empty = ChatTemplate.from_model_info(ModelInfo(**{**info.__dict__, "chat_template": ""}))
    assert not empty.available


def test_module_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import router.chat_template, sys; "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
