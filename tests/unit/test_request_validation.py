"""validate_request (through the gRPC API's `input_from_proto`): every rule, and every error
names its proto field."""

from __future__ import annotations

import math
from typing import Any

import pytest
from tokenizers import Tokenizer, normalizers

from pdserve.config import LimitsConfig
from pdserve.errors import InvalidArgument
from pdserve.messages import ModelInfo
from pdserve.v1 import pdserve_pb2
from router.proto_input import input_from_proto
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest, validate_request
from tests.factories.tokenizer import train_byte_level_tokenizer

TOKENIZER = train_byte_level_tokenizer()
VOCAB_SIZE = TOKENIZER.get_vocab_size()
LIMITS = LimitsConfig(
    max_tokens=16, max_stop_strings=2, max_stop_string_chars=5, max_stop_token_ids=2
)
MAX_CONTEXT_TOKENS = 64


def router_tokenizer(
    tokenizer: Tokenizer = TOKENIZER, vocab_size: int = VOCAB_SIZE
) -> RouterTokenizer:
    info = ModelInfo(
        model="test",
        dtype="float32",
        model_type="llama",
        vocab_size=vocab_size,
        max_context_tokens=MAX_CONTEXT_TOKENS,
        eos_token_ids=[0],
        tokenizer_json=tokenizer.to_str(),
        kv_fingerprint="test",
    )
    return RouterTokenizer.from_model_info(info)


ROUTER_TOKENIZER = router_tokenizer()


def make_request(
    text: str | None = "Hello", token_ids: list[int] | None = None, **sampling: Any
) -> pdserve_pb2.GenerateRequest:
    request = pdserve_pb2.GenerateRequest()
    if token_ids is not None:
        request.token_ids.ids.extend(token_ids)
        request.token_ids.SetInParent()
    elif text is not None:
        request.text = text
    sampling.setdefault("max_tokens", 8)
    request.sampling.CopyFrom(pdserve_pb2.SamplingParams(**sampling))
    return request


def validate(
    request: pdserve_pb2.GenerateRequest,
    tokenizer: RouterTokenizer = ROUTER_TOKENIZER,
    max_context_tokens: int = MAX_CONTEXT_TOKENS,
) -> ValidatedRequest:
    return validate_request(input_from_proto(request), tokenizer, LIMITS, max_context_tokens)


def expect_error(request: pdserve_pb2.GenerateRequest, field: str, **kwargs: Any) -> str:
    """Asserts that validation fails on `field` with a short message; returns the message."""
    with pytest.raises(InvalidArgument) as info:
        validate(request, **kwargs)
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ")
    assert len(info.value.message) <= 100, info.value.message
    return info.value.message


def test_text_prompt_is_tokenized_with_defaults_applied() -> None:
    validated = validate(make_request("Hello, world!"))
    assert validated.prompt_token_ids == TOKENIZER.encode("Hello, world!").ids
    assert validated.prompt_text == "Hello, world!"
    assert validated.num_prompt_tokens == len(validated.prompt_token_ids)
    assert validated.sampling.max_tokens == 8
    assert validated.sampling.temperature == 0.0
    assert validated.sampling.top_p == 1.0
    assert validated.sampling.top_k == 0
    assert validated.sampling.seed is None
    assert validated.sampling.stop_token_ids == []
    assert validated.sampling.ignore_eos is False
    assert validated.stop == []


def test_token_id_prompt_passes_through() -> None:
    validated = validate(make_request(token_ids=[5, 0, VOCAB_SIZE - 1]))
    assert validated.prompt_token_ids == [5, 0, VOCAB_SIZE - 1]
    assert validated.prompt_text is None


def test_sampling_fields_pass_through() -> None:
    request = make_request(
        max_tokens=LIMITS.max_tokens,
        temperature=0.5,
        top_p=0.25,
        top_k=40,
        seed=7,
        stop=["ab", "12345"],
        stop_token_ids=[0, VOCAB_SIZE - 1],
        ignore_eos=True,
    )
    validated = validate(request)
    assert validated.sampling.max_tokens == LIMITS.max_tokens
    assert validated.sampling.temperature == 0.5
    assert validated.sampling.top_p == 0.25
    assert validated.sampling.top_k == 40
    assert validated.sampling.seed == 7
    assert validated.sampling.stop_token_ids == [0, VOCAB_SIZE - 1]
    assert validated.sampling.ignore_eos is True
    assert validated.stop == ["ab", "12345"]


def test_missing_prompt() -> None:
    expect_error(make_request(text=None), "prompt")


def test_empty_prompts() -> None:
    expect_error(make_request(""), "prompt.text")
    expect_error(make_request(token_ids=[]), "prompt.token_ids")


def test_text_that_encodes_to_nothing() -> None:
    stripping = Tokenizer.from_str(TOKENIZER.to_str())
    stripping.normalizer = normalizers.Strip()
    expect_error(make_request("   "), "prompt.text", tokenizer=router_tokenizer(stripping))


def test_prompt_token_ids_outside_the_vocabulary() -> None:
    assert str(VOCAB_SIZE) in expect_error(
        make_request(token_ids=[1, VOCAB_SIZE]), "prompt.token_ids"
    )
    assert "-1" in expect_error(make_request(token_ids=[-1]), "prompt.token_ids")


def test_text_encoding_beyond_the_model_vocabulary() -> None:
    text = "The quick brown fox"
    assert max(TOKENIZER.encode(text).ids) >= 300, "precondition: uses merged tokens"
    expect_error(make_request(text), "prompt.text", tokenizer=router_tokenizer(vocab_size=300))


def test_prompt_plus_max_tokens_must_fit_the_context() -> None:
    validate(make_request(token_ids=[2] * 56, max_tokens=8))
    message = expect_error(make_request(token_ids=[2] * 57, max_tokens=8), "prompt")
    assert "57" in message and "8" in message and "64" in message
    long_text = "x" * 100
    assert len(TOKENIZER.encode(long_text).ids) + 8 > MAX_CONTEXT_TOKENS
    expect_error(make_request(long_text), "prompt")


def test_max_tokens_alone_beyond_the_context() -> None:
    message = expect_error(
        make_request(max_tokens=12), "sampling.max_tokens", max_context_tokens=10
    )
    assert "12" in message and "10" in message


def test_missing_sampling_is_greedy_with_max_tokens_unset() -> None:
    validated = validate(pdserve_pb2.GenerateRequest(text="Hello"))
    prompt = validated.num_prompt_tokens
    assert validated.sampling.max_tokens == min(LIMITS.max_tokens, MAX_CONTEXT_TOKENS - prompt)
    assert validated.sampling.temperature == 0.0
    assert validated.sampling.top_p == 1.0


def test_max_tokens_zero_means_as_many_as_fit() -> None:
    assert validate(make_request(max_tokens=0)).sampling.max_tokens == LIMITS.max_tokens
    near_full = validate(make_request(token_ids=[2] * 60, max_tokens=0))
    assert near_full.sampling.max_tokens == MAX_CONTEXT_TOKENS - 60


@pytest.mark.parametrize("max_tokens", [-1, LIMITS.max_tokens + 1])
def test_max_tokens_bounds(max_tokens: int) -> None:
    expect_error(make_request(max_tokens=max_tokens), "sampling.max_tokens")


def test_priority_passes_through_and_defaults_to_zero() -> None:
    assert validate(make_request()).priority == 0
    request = make_request()
    request.priority = -5
    assert validate(request).priority == -5
    request.priority = 2**31 - 1
    assert validate(request).priority == 2**31 - 1


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf, -0.5])
def test_bad_temperature(temperature: float) -> None:
    expect_error(make_request(temperature=temperature), "sampling.temperature")


@pytest.mark.parametrize("top_p", [math.nan, -0.1, 1.5, math.inf])
def test_bad_top_p(top_p: float) -> None:
    expect_error(make_request(top_p=top_p), "sampling.top_p")


def test_top_p_one_is_accepted() -> None:
    assert validate(make_request(top_p=1.0)).sampling.top_p == 1.0


def test_negative_top_k() -> None:
    expect_error(make_request(top_k=-1), "sampling.top_k")


def test_stop_string_limits() -> None:
    expect_error(make_request(stop=["a", "b", "c"]), "sampling.stop")
    expect_error(make_request(stop=["a", ""]), "sampling.stop")
    assert "6" in expect_error(make_request(stop=["123456"]), "sampling.stop")


def test_stop_token_id_limits() -> None:
    expect_error(make_request(stop_token_ids=[1, 2, 3]), "sampling.stop_token_ids")
    expect_error(make_request(stop_token_ids=[VOCAB_SIZE]), "sampling.stop_token_ids")
    expect_error(make_request(stop_token_ids=[-5]), "sampling.stop_token_ids")


@pytest.mark.parametrize(
    ("seed", "expected"),
    [(0, 0), (42, 42), (2**63 - 1, 2**63 - 1), (2**63, 0), (2**64 - 1, 2**63 - 1)],
)
def test_seed_fits_a_signed_int64(seed: int, expected: int) -> None:
    assert validate(make_request(seed=seed)).sampling.seed == expected


def test_unset_seed_stays_unset_while_zero_is_kept() -> None:
    assert validate(make_request()).sampling.seed is None
    assert validate(make_request(seed=0)).sampling.seed == 0
