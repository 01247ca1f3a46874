"""Admission checks: a `GenerateInput` becomes a `ValidatedRequest` or an `InvalidArgument`.

One set of rules for both public APIs. Every error names the field by its gRPC path
(`prompt.text`, `sampling.max_tokens`, ...) and the bound it broke, in a few words; the HTTP
layer renames the field to its own parameter. Two stages: `check_request` runs every check
that needs no tokens, cheap whatever the prompt's size (it refuses a prompt with more characters
than the context's tokens could spell, `max_prompt_chars`); `tokenize_request` then renders a
chat, tokenizes, and checks what needs the tokens (CPU time grows with the prompt, up to that
bound: the front door runs it in a thread pool). `validate_request` runs both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.config import LimitsConfig
from pdserve.errors import InvalidArgument
from pdserve.messages import SamplingParams
from router.generate_input import CHAT_ROLES, ROLE_ALIASES, ChatTurn, GenerateInput
from router.tokenizer import RouterTokenizer

# Seeds travel as signed 64-bit integers (msgpack, torch generators).
SEED_MODULUS = 2**63
# The most alternatives a token's logprobs may list (OpenAI's bound).
MAX_TOP_LOGPROBS = 20
# Priorities are the proto's int32 on every API.
PRIORITY_BOUNDS = (-(2**31), 2**31 - 1)
# Allowance for normalizers that compose characters (NFC: "e" + U+0301 -> "é") on top of
# `RouterTokenizer.max_chars_per_token` in the character bound.
PROMPT_CHARS_MARGIN = 2


@dataclass(frozen=True)
class ValidatedRequest:
    """A request that passed admission, in pdserve's own types."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]
    # The prompt as text (the client's, or the rendered chat), or None for token ids.
    prompt_text: str | None
    # Independent sequences to sample for this prompt.
    num_choices: int = 1
    # Scheduling priority: lower first (the router queue; reversed, decode preemption).
    priority: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def validate_request(
    request: GenerateInput,
    tokenizer: RouterTokenizer,
    limits: LimitsConfig,
    max_context_tokens: int,
) -> ValidatedRequest:
    """Checks every field, renders a chat and tokenizes a text prompt, synchronously:
    `check_request`, then `tokenize_request`. Raises `InvalidArgument` naming the first
    offending field."""
    check_request(request, tokenizer, limits, max_context_tokens)
    return tokenize_request(request, tokenizer, limits, max_context_tokens)


def check_request(
    request: GenerateInput,
    tokenizer: RouterTokenizer,
    limits: LimitsConfig,
    max_context_tokens: int,
) -> None:
    """Every check that needs no tokens; cheap whatever the prompt's size (fit for the event
    loop). Raises `InvalidArgument` naming the first offending field."""
    form = _check_prompt_form(request)
    _check_prompt_chars(request, form, tokenizer, max_context_tokens)
    _check_choices(request.num_choices, limits)
    _check_priority(request.priority)
    _check_stop_strings(request.stop, limits)
    _check_max_tokens(request.max_tokens, limits, max_context_tokens)
    _check_sampling_values(request, tokenizer.vocab_size, limits)


def tokenize_request(
    request: GenerateInput,
    tokenizer: RouterTokenizer,
    limits: LimitsConfig,
    max_context_tokens: int,
) -> ValidatedRequest:
    """Renders a chat and tokenizes a text prompt of a request `check_request` passed, and
    checks what needs the tokens (vocabulary, room in the context, min_tokens).

    Synchronous and thread-safe; CPU time grows with the prompt (up to `max_prompt_chars`).
    Raises `InvalidArgument` naming the first offending field.
    """
    form = request.prompt_form
    assert form is not None, "check_request refuses a request without exactly one prompt"
    prompt_token_ids, prompt_text = _prompt_tokens(request, form, tokenizer, max_context_tokens)
    max_tokens = _resolve_max_tokens(
        request.max_tokens, len(prompt_token_ids), limits, max_context_tokens
    )
    if request.min_tokens > max_tokens:
        raise InvalidArgument(
            "sampling.min_tokens", f"{request.min_tokens} exceeds max_tokens {max_tokens}"
        )
    return ValidatedRequest(
        prompt_token_ids, _sampling_params(request, max_tokens), list(request.stop),
        prompt_text, num_choices=request.num_choices, priority=request.priority,
    )


def max_prompt_chars(tokenizer: RouterTokenizer, max_context_tokens: int) -> int:
    """Most characters a prompt (a text, or a conversation's contents and names) may have: a
    longer one encodes to more tokens than the context holds (see
    `RouterTokenizer.max_chars_per_token` for why, and for what the margin allows; a chat
    template that drops content, such as earlier turns' reasoning, is the exception)."""
    return max_context_tokens * tokenizer.max_chars_per_token * PROMPT_CHARS_MARGIN


def _check_prompt_form(request: GenerateInput) -> str:
    form = request.prompt_form
    if form is None:
        raise InvalidArgument("prompt", "set exactly one of text, token_ids or messages")
    if form == "text" and not request.text:
        raise InvalidArgument("prompt.text", "must not be empty")
    if form == "token_ids" and not request.token_ids:
        raise InvalidArgument("prompt.token_ids", "must not be empty")
    if form == "messages":
        _check_messages(request.messages or [])
    elif request.chat_template_kwargs:
        raise InvalidArgument("prompt.messages.chat_template_kwargs", "only with messages")
    return form


def _check_prompt_chars(
    request: GenerateInput, form: str, tokenizer: RouterTokenizer, max_context_tokens: int
) -> None:
    """Refuses, before any rendering or tokenizing, a prompt too long to fit the context."""
    num_chars, max_chars = request.num_prompt_chars, max_prompt_chars(tokenizer, max_context_tokens)
    if num_chars > max_chars:
        raise InvalidArgument(
            f"prompt.{form}",
            f"{num_chars} characters cannot fit {max_context_tokens} context tokens "
            f"(at most {max_chars})",
        )


def _check_messages(messages: list[ChatTurn]) -> None:
    if not messages:
        raise InvalidArgument("prompt.messages", "must hold at least one message")
    for index, turn in enumerate(messages):
        role = ROLE_ALIASES.get(turn.role, turn.role)
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                "prompt.messages",
                f"message {index} has role {turn.role[:32]!r}; "
                f"supported: {', '.join(CHAT_ROLES)}",
            )


def _prompt_tokens(
    request: GenerateInput, form: str, tokenizer: RouterTokenizer, max_context_tokens: int
) -> tuple[list[int], str | None]:
    """The prompt's token ids and text; checks vocabulary and that the prompt leaves room."""
    if form == "token_ids":
        token_ids = list(request.token_ids or [])
        _check_ids_in_vocab("prompt.token_ids", token_ids, tokenizer.vocab_size)
        _check_prompt_fits(len(token_ids), max_context_tokens)
        return token_ids, None
    if form == "messages":
        field = "prompt.messages"
        text = tokenizer.render_chat(
            [_template_message(turn) for turn in request.messages or []],
            request.chat_template_kwargs,
        )
        token_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        field = "prompt.text"
        text = request.text or ""
        token_ids = tokenizer.encode(text)
    if not token_ids:
        raise InvalidArgument(field, "encodes to zero tokens")
    _check_ids_in_vocab(field, token_ids, tokenizer.vocab_size)
    _check_prompt_fits(len(token_ids), max_context_tokens)
    return token_ids, text


def _template_message(turn: ChatTurn) -> dict[str, str]:
    message = {"role": ROLE_ALIASES.get(turn.role, turn.role), "content": turn.content}
    if turn.name is not None:
        message["name"] = turn.name
    return message


def _check_sampling_values(request: GenerateInput, vocab_size: int, limits: LimitsConfig) -> None:
    temperature = request.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(
            "sampling.temperature", f"must be finite and >= 0, got {temperature:g}"
        )
    top_p = request.top_p
    if math.isnan(top_p) or top_p <= 0 or top_p > 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {top_p:g}")
    if request.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {request.top_k}")
    if request.min_tokens < 0:
        raise InvalidArgument("sampling.min_tokens", f"must be >= 0, got {request.min_tokens}")
    _check_logprobs(request)
    if len(request.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument(
            "sampling.stop_token_ids",
            f"at most {limits.max_stop_token_ids} ids, got {len(request.stop_token_ids)}",
        )
    _check_ids_in_vocab("sampling.stop_token_ids", request.stop_token_ids, vocab_size)


def _sampling_params(request: GenerateInput, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed % SEED_MODULUS if request.seed is not None else None,
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


def _check_max_tokens(
    max_tokens: int | None, limits: LimitsConfig, max_context_tokens: int
) -> None:
    """Bounds that hold whatever the prompt (None: unset, resolved after tokenizing)."""
    if max_tokens is None:
        return
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


def _resolve_max_tokens(
    max_tokens: int | None, num_prompt_tokens: int, limits: LimitsConfig, max_context_tokens: int
) -> int:
    """The request's max_tokens, checked against the room the prompt leaves; unset = as many
    as fit (the prompt check left room for at least one), at most `limits.max_tokens`."""
    room = max_context_tokens - num_prompt_tokens
    if max_tokens is None:
        return min(limits.max_tokens, room)
    if max_tokens > room:
        raise InvalidArgument(
            "prompt",
            f"{num_prompt_tokens} prompt tokens + {max_tokens} max_tokens exceeds the context "
            f"of {max_context_tokens} tokens",
        )
    return max_tokens


def _check_logprobs(request: GenerateInput) -> None:
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            "sampling.top_logprobs",
            f"must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}",
        )
    if request.top_logprobs and not request.logprobs:
        raise InvalidArgument("sampling.top_logprobs", "needs logprobs to be true")


def _check_choices(num_choices: int, limits: LimitsConfig) -> None:
    if not 1 <= num_choices <= limits.max_n:
        raise InvalidArgument("n", f"must be in [1, {limits.max_n}], got {num_choices}")


def _check_priority(priority: int) -> None:
    low, high = PRIORITY_BOUNDS
    if not low <= priority <= high:
        raise InvalidArgument("priority", f"must be in [{low}, {high}], got {priority}")


def _check_stop_strings(stop: list[str], limits: LimitsConfig) -> None:
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


def _check_ids_in_vocab(field: str, token_ids: list[int], vocab_size: int) -> None:
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return
    index, token_id = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab_size)
    raise InvalidArgument(field, f"id {token_id} at index {index} is outside [0, {vocab_size})")


def _check_prompt_fits(num_prompt_tokens: int, max_context_tokens: int) -> None:
    """The prompt must leave room for at least one generated token."""
    if num_prompt_tokens >= max_context_tokens:
        raise InvalidArgument(
            "prompt",
            f"{num_prompt_tokens} prompt tokens leave no room in the context of "
            f"{max_context_tokens} tokens",
        )
