"""The OpenAI request bodies pdserve accepts, parsed strictly.

A body is JSON (UTF-8, no NaN, no lone surrogates) holding one object; pydantic checks it in
strict mode (no "1" for 1, no 1 for true). Unknown keys are refused, as OpenAI does. OpenAI
parameters pdserve does not implement are declared too, so that a neutral value (penalty 0, no
tools, text response format) passes and anything else is refused naming the parameter: a
parameter is never ignored silently. Fields whose JSON type varies (`stop`, `prompt`,
`content`) are typed `Any` here and checked by the endpoint's input builder, so error locations
stay plain parameter paths.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from router.http.errors import HttpErrorResponse, invalid_param

_STRICT = ConfigDict(extra="forbid", strict=True)
Model = TypeVar("Model", bound=BaseModel)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatMessageIn(BaseModel):
    model_config = _STRICT
    role: str
    # A string or a list of {"type": "text", "text": ...} parts.
    content: Any = None
    name: str | None = None


class SamplingFields(BaseModel):
    """Parameters both endpoints share, with the vLLM extensions users rely on."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    user: str | None = None
    top_k: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    # Scheduling priority, lower served first (vLLM's extension; the gRPC API's `priority`).
    priority: int = 0
    # OpenAI parameters not implemented: only neutral values pass (`unsupported_values`).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # An identifier like `user`: accepted, unused.
    safety_identifier: str | None = None
    # Not implemented: only neutral values pass.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: Any = None
    verbosity: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    moderation: Any = None


class CompletionRequest(SamplingFields):
    # A string, a list of token ids, or a one-element list of either.
    prompt: Any = None
    # Number of top alternatives per token (0..20), None = no logprobs.
    logprobs: int | None = None
    # Not implemented: only neutral values pass.
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# Parameter -> the values that mean "not used" (None always passes).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "echo": (False,),
    "suffix": ("",),
}
_ALWAYS_REFUSED = (
    "reasoning_effort", "verbosity", "audio", "prediction", "web_search_options",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "moderation",
)


def parse_body(body: bytes, model: type[Model]) -> Model:
    """The body as `model`; raises `HttpErrorResponse` (400) naming the parameter."""
    data = _load_json(body)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise HttpErrorResponse(_first_problem(exc)) from None
    _refuse_unsupported(request)
    return request


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpErrorResponse(
            invalid_param(None, f"the body is not valid UTF-8 (byte {exc.start})")
        ) from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise HttpErrorResponse(invalid_param(None, f"the body is not valid JSON: {exc}")) from None
    if not isinstance(data, dict):
        raise HttpErrorResponse(invalid_param(None, "the body must be a JSON object"))
    bad_path = _lone_surrogate_path(data, "")
    if bad_path is not None:
        raise HttpErrorResponse(
            invalid_param(bad_path or None, "holds a lone UTF-16 surrogate (not valid Unicode)")
        )
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _lone_surrogate_path(value: Any, path: str) -> str | None:
    """Path of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if _has_surrogate(key):
                return path or "body"
            found = _lone_surrogate_path(item, child)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_problem(exc: ValidationError) -> Any:
    error = exc.errors()[0]
    param = _param_path(error["loc"])
    if error["type"] == "extra_forbidden":
        return invalid_param(param, "unrecognized request argument (not an OpenAI parameter "
                             "pdserve knows)")
    if error["type"] == "missing":
        return invalid_param(param, "required")
    return invalid_param(param, str(error["msg"]))


def _param_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _refuse_unsupported(request: BaseModel) -> None:
    for name, neutral in _NEUTRAL.items():
        value = getattr(request, name, None)
        if value is not None and value not in neutral:
            raise HttpErrorResponse(invalid_param(name, f"{value!r:.40} is not supported"))
    for name in _ALWAYS_REFUSED:
        if getattr(request, name, None) is not None:
            raise HttpErrorResponse(invalid_param(name, "is not supported"))
    best_of = getattr(request, "best_of", None)
    if best_of is not None and best_of != getattr(request, "n", 1):
        raise HttpErrorResponse(invalid_param("best_of", "only best_of == n is supported"))
