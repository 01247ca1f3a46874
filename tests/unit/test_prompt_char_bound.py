"""The character bound: a prompt with more characters than the context's tokens could spell is
refused before it is rendered or tokenized, naming its field and both numbers; one at the bound
is tokenized as usual. `max_chars_per_token` is sound for the tokenizers we serve."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer

from pdserve.config import LimitsConfig
from pdserve.errors import InvalidArgument
from router.generate_input import ChatTurn, GenerateInput
from router.tokenizer import RouterTokenizer
from router.validation import PROMPT_CHARS_MARGIN, max_prompt_chars, validate_request
from tests.factories.fake_flow import tokenizer_model_info
from tests.factories.tokenizer import (
    CORPUS,
    EOS_TOKEN,
    train_byte_level_tokenizer,
    train_sentencepiece_style_tokenizer,
)

MAX_CONTEXT_TOKENS = 64
LIMITS = LimitsConfig(max_tokens=16)


class SpyTokenizer(RouterTokenizer):
    """A real router tokenizer that records what it is asked to render and encode."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append("encode")
        return super().encode(text, add_special_tokens)

    def render_chat(
        self, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None
    ) -> str:
        self.calls.append("render_chat")
        return super().render_chat(messages, template_kwargs)


def spy_tokenizer(tokenizer: Tokenizer | None = None) -> SpyTokenizer:
    tokenizer = tokenizer or train_byte_level_tokenizer()
    info = tokenizer_model_info(tokenizer, MAX_CONTEXT_TOKENS)
    return SpyTokenizer(Tokenizer.from_str(info.tokenizer_json), info)


def refusal(request: GenerateInput, tokenizer: RouterTokenizer) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        validate_request(request, tokenizer, LIMITS, MAX_CONTEXT_TOKENS)
    return caught.value


def test_max_chars_per_token_is_the_longest_entry_added_tokens_included() -> None:
    tokenizer = train_byte_level_tokenizer()
    added = "<|a_long_added_token_beyond_the_vocabulary|>"
    tokenizer.add_special_tokens([added])
    assert len(added) > max(map(len, tokenizer.get_vocab(with_added_tokens=False)))
    router = spy_tokenizer(tokenizer)
    assert router.max_chars_per_token == len(added)
    assert len(router.encode(added * 10)) == 10  # why added tokens must count
    assert max_prompt_chars(router, 100) == 100 * len(added) * PROMPT_CHARS_MARGIN


@pytest.mark.parametrize(
    "tokenizer",
    [train_byte_level_tokenizer(), train_sentencepiece_style_tokenizer()],
    ids=["byte-level", "sentencepiece-byte-fallback"],
)
def test_no_text_spells_more_characters_per_token_than_the_bound(tokenizer: Tokenizer) -> None:
    router = spy_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    longest_piece = tokenizer.decode([vocab[max(vocab, key=len)]])
    texts = [
        " ".join(CORPUS), " " * 10_000, "a" * 10_000, longest_piece * 500, EOS_TOKEN * 500,
        "é" * 2000, "👩‍💻" * 500, "e\u0301" * 2000,
    ]
    for text in texts:
        num_tokens = len(router.encode(text))
        assert len(text) <= num_tokens * router.max_chars_per_token, text[:40]


def test_text_over_the_bound_is_refused_without_tokenizing() -> None:
    tokenizer = spy_tokenizer()
    limit = max_prompt_chars(tokenizer, MAX_CONTEXT_TOKENS)
    error = refusal(GenerateInput(text="a" * (limit + 1)), tokenizer)
    assert error.field == "prompt.text"
    assert f"{limit + 1} characters" in error.message and f"at most {limit}" in error.message
    assert str(MAX_CONTEXT_TOKENS) in error.message
    assert tokenizer.calls == []


def test_text_at_the_bound_is_tokenized() -> None:
    tokenizer = spy_tokenizer()
    limit = max_prompt_chars(tokenizer, MAX_CONTEXT_TOKENS)
    error = refusal(GenerateInput(text="a" * limit), tokenizer)
    # Tokenized, then refused by the token count: the character bound let it through.
    assert tokenizer.calls == ["encode"]
    assert error.field == "prompt" and "prompt tokens leave no room" in error.message


def conversation(num_chars: int) -> list[ChatTurn]:
    """Two turns whose contents and names add up to `num_chars` characters."""
    name = "n" * 10
    first = (num_chars - len(name)) // 2
    return [
        ChatTurn("system", "s" * first),
        ChatTurn("user", "u" * (num_chars - len(name) - first), name=name),
    ]


def test_messages_over_the_bound_are_refused_without_rendering() -> None:
    tokenizer = spy_tokenizer()
    limit = max_prompt_chars(tokenizer, MAX_CONTEXT_TOKENS)
    error = refusal(GenerateInput(messages=conversation(limit + 1)), tokenizer)
    assert error.field == "prompt.messages"
    assert f"{limit + 1} characters" in error.message and f"at most {limit}" in error.message
    assert tokenizer.calls == []


def test_messages_at_the_bound_are_rendered_and_tokenized() -> None:
    tokenizer = spy_tokenizer()
    limit = max_prompt_chars(tokenizer, MAX_CONTEXT_TOKENS)
    error = refusal(GenerateInput(messages=conversation(limit)), tokenizer)
    assert tokenizer.calls == ["render_chat", "encode"]
    assert error.field == "prompt"


def test_short_prompts_and_token_ids_are_unaffected() -> None:
    tokenizer = spy_tokenizer()
    validated = validate_request(GenerateInput(text="Hello"), tokenizer, LIMITS, MAX_CONTEXT_TOKENS)
    assert validated.prompt_text == "Hello"
    many_ids = GenerateInput(token_ids=[5] * (MAX_CONTEXT_TOKENS - 1), max_tokens=1)
    validated = validate_request(many_ids, tokenizer, LIMITS, MAX_CONTEXT_TOKENS)
    assert validated.num_prompt_tokens == MAX_CONTEXT_TOKENS - 1
