"""OpenAI request bodies -> `GenerateInput`, with OpenAI's defaults.

OpenAI's defaults differ from the gRPC API's: temperature 1 and top_p 1 when unset; no
max_tokens means as many as fit the context, up to `limits.max_tokens` (vLLM's behaviour).
`top_k` -1 (vLLM's "off") is read as 0. Each endpoint also gives the table that renames
validation's field paths to its parameters.
"""

from __future__ import annotations

from typing import Any

from router.generate_input import ChatTurn, GenerateInput
from router.http.errors import COMMON_PARAMS, HttpErrorResponse, invalid_param
from router.http.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

CHAT_PARAMS: dict[str, str] = {
    **COMMON_PARAMS,
    "prompt": "messages",
    "prompt.messages": "messages",
    "prompt.messages.chat_template_kwargs": "chat_template_kwargs",
    "sampling.top_logprobs": "top_logprobs",
}
COMPLETION_PARAMS: dict[str, str] = {
    **COMMON_PARAMS,
    "prompt": "prompt",
    "prompt.text": "prompt",
    "prompt.token_ids": "prompt",
    "sampling.top_logprobs": "logprobs",
}


def chat_input(request: ChatCompletionRequest) -> GenerateInput:
    """The chat request in pdserve's terms; raises `HttpErrorResponse` for shapes only JSON
    can get wrong (content parts, `stop` types, conflicting max_tokens)."""
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    elif request.max_tokens is not None and request.max_tokens != max_tokens:
        raise HttpErrorResponse(
            invalid_param("max_tokens", "differs from max_completion_tokens; send one")
        )
    turns = [
        ChatTurn(message.role, _content_text(message.content, index), message.name)
        for index, message in enumerate(request.messages)
    ]
    return GenerateInput(
        messages=turns,
        chat_template_kwargs=dict(request.chat_template_kwargs or {}),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
        **_sampling(request, max_tokens),
    )


def completion_input(request: CompletionRequest) -> GenerateInput:
    """The completion request in pdserve's terms (one prompt per request)."""
    prompt = _single_prompt(request.prompt)
    prompt_fields: dict[str, Any] = (
        {"text": prompt} if isinstance(prompt, str) else {"token_ids": prompt}
    )
    return GenerateInput(
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs or 0,
        **prompt_fields,
        **_sampling(request, request.max_tokens),
    )


def _sampling(request: SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    """The `GenerateInput` fields both endpoints share (sampling, n and priority)."""
    top_k = request.top_k if request.top_k is not None else 0
    return {
        "max_tokens": max_tokens,
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "top_k": 0 if top_k == -1 else top_k,
        "seed": request.seed,
        "stop": _stop_strings(request.stop),
        "stop_token_ids": list(request.stop_token_ids or []),
        "ignore_eos": request.ignore_eos,
        "min_tokens": request.min_tokens,
        "num_choices": request.n,
        "priority": request.priority,
    }


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return list(stop)
    raise HttpErrorResponse(invalid_param("stop", "must be a string or a list of strings"))


def _content_text(content: Any, index: int) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines."""
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise HttpErrorResponse(invalid_param(param, "must be a string or a list of parts"))
    texts = []
    for part_index, part in enumerate(content):
        part_param = f"{param}[{part_index}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise HttpErrorResponse(invalid_param(part_param, "only text parts are supported"))
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise HttpErrorResponse(
                invalid_param(part_param, 'a text part is {"type": "text", "text": string}')
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _single_prompt(prompt: Any) -> str | list[int]:
    """One prompt: a string or token ids, bare or as the only element of a list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(_is_int(item) for item in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise HttpErrorResponse(
            invalid_param("prompt", "one prompt per request is supported (got a batch)")
        )
    if prompt is None:
        raise HttpErrorResponse(invalid_param("prompt", "required"))
    raise HttpErrorResponse(
        invalid_param("prompt", "must be a string or a list of token ids")
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
