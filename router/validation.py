"""Admission checks: a `GenerateRequest` becomes a `ValidatedRequest` or an `InvalidArgument`.

Every error names the proto field path (`prompt.text`, `sampling.max_tokens`, ...) and the bound
it broke, in a few words. Cheap field checks run before the prompt is tokenized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.config import LimitsConfig
from pdserve.errors import InvalidArgument
from pdserve.messages import SamplingParams
from pdserve.v1 import pdserve_pb2
from router.tokenizer import RouterTokenizer

# Seeds travel as signed 64-bit integers (msgpack, torch generators).
_SEED_MODULUS = 2**63


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed admission, in pdserve's own types."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]
    # The prompt as the client sent it, or None for a pre-tokenized prompt.
    prompt_text: str | None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def validate_request(
    request: pdserve_pb2.GenerateRequest,
    tokenizer: RouterTokenizer,
    limits: LimitsConfig,
    max_context_tokens: int,
) -> ValidatedRequest:
    """Checks every field and tokenizes a text prompt.

    Called by the Generate servicer before admission; synchronous (tokenizing is CPU work that
    grows with the prompt, which the gRPC size limit bounds). Raises `InvalidArgument` naming the
    first offending field.
    """
    prompt_form = _check_prompt_form(request)
    sampling = _check_sampling(request, tokenizer.vocab_size, limits, max_context_tokens)
    stop = _check_stop_strings(request.sampling, limits)
    if prompt_form == "text":
        prompt_token_ids = tokenizer.encode(request.text)
        if not prompt_token_ids:
            raise InvalidArgument("prompt.text", "encodes to zero tokens")
        _check_context(len(prompt_token_ids), sampling.max_tokens, max_context_tokens)
        _check_ids_in_vocab("prompt.text", prompt_token_ids, tokenizer.vocab_size)
        return ValidatedRequest(prompt_token_ids, sampling, stop, prompt_text=request.text)
    prompt_token_ids = list(request.token_ids.ids)
    _check_context(len(prompt_token_ids), sampling.max_tokens, max_context_tokens)
    _check_ids_in_vocab("prompt.token_ids", prompt_token_ids, tokenizer.vocab_size)
    return ValidatedRequest(prompt_token_ids, sampling, stop, prompt_text=None)


def _check_prompt_form(request: pdserve_pb2.GenerateRequest) -> str:
    form = request.WhichOneof("prompt")
    if form is None:
        raise InvalidArgument("prompt", "set exactly one of text or token_ids")
    if form == "text" and not request.text:
        raise InvalidArgument("prompt.text", "must not be empty")
    if form == "token_ids" and not request.token_ids.ids:
        raise InvalidArgument("prompt.token_ids", "must not be empty")
    return form


def _check_sampling(
    request: pdserve_pb2.GenerateRequest,
    vocab_size: int,
    limits: LimitsConfig,
    max_context_tokens: int,
) -> SamplingParams:
    if not request.HasField("sampling"):
        raise InvalidArgument("sampling.max_tokens", "required (sampling is not set)")
    proto = request.sampling
    max_tokens = _check_max_tokens(proto.max_tokens, limits, max_context_tokens)
    temperature = proto.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(
            "sampling.temperature", f"must be finite and >= 0, got {temperature:g}"
        )
    top_p = proto.top_p
    if math.isnan(top_p) or top_p < 0 or top_p > 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1] (0 = unset), got {top_p:g}")
    if proto.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {proto.top_k}")
    stop_token_ids = list(proto.stop_token_ids)
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument(
            "sampling.stop_token_ids",
            f"at most {limits.max_stop_token_ids} ids, got {len(stop_token_ids)}",
        )
    _check_ids_in_vocab("sampling.stop_token_ids", stop_token_ids, vocab_size)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p if top_p > 0 else 1.0,
        top_k=proto.top_k,
        seed=proto.seed % _SEED_MODULUS if proto.HasField("seed") else None,
        stop_token_ids=stop_token_ids,
        ignore_eos=proto.ignore_eos,
    )


def _check_max_tokens(max_tokens: int, limits: LimitsConfig, max_context_tokens: int) -> int:
    if max_tokens < 1:
        raise InvalidArgument("sampling.max_tokens", f"must be >= 1, got {max_tokens}")
    if max_tokens > limits.max_tokens:
        raise InvalidArgument(
            "sampling.max_tokens", f"must be <= {limits.max_tokens}, got {max_tokens}"
        )
    if max_tokens > max_context_tokens:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"{max_tokens} exceeds the context of {max_context_tokens} tokens",
        )
    return max_tokens


def _check_stop_strings(proto: pdserve_pb2.SamplingParams, limits: LimitsConfig) -> list[str]:
    stop = list(proto.stop)
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "sampling.stop", f"at most {limits.max_stop_strings} strings, got {len(stop)}"
        )
    for index, text in enumerate(stop):
        if not text:
            raise InvalidArgument("sampling.stop", f"string {index} is empty")
        if len(text) > limits.max_stop_string_chars:
            raise InvalidArgument(
                "sampling.stop",
                f"string {index} has {len(text)} chars, limit {limits.max_stop_string_chars}",
            )
    return stop


def _check_ids_in_vocab(field: str, token_ids: list[int], vocab_size: int) -> None:
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return
    index, token_id = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab_size)
    raise InvalidArgument(field, f"id {token_id} at index {index} is outside [0, {vocab_size})")


def _check_context(num_prompt_tokens: int, max_tokens: int, max_context_tokens: int) -> None:
    if num_prompt_tokens + max_tokens > max_context_tokens:
        raise InvalidArgument(
            "prompt",
            f"{num_prompt_tokens} prompt tokens + {max_tokens} max_tokens exceeds the context "
            f"of {max_context_tokens} tokens",
        )
