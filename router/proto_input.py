"""`pdserve.v1.GenerateRequest` -> `GenerateInput`, with the gRPC API's own defaults.

gRPC defaults are proto3's zeros: temperature 0 (greedy), top_p 0 meaning 1, no seed unless
set, priority 0. `max_tokens` 0 (or no `sampling` at all) means unset: as many as fit the
context, at most `limits.max_tokens` (validation resolves it); a negative one is refused there.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict

from pdserve.v1 import pdserve_pb2
from router.generate_input import ChatTurn, GenerateInput


def input_from_proto(request: pdserve_pb2.GenerateRequest) -> GenerateInput:
    """The request in pdserve's terms; raises nothing (every check is `router.validation`'s).
    An unset `sampling` reads as all zeros, like any unset proto3 message."""
    sampling = request.sampling
    return GenerateInput(
        **_prompt_fields(request),
        max_tokens=sampling.max_tokens if sampling.max_tokens != 0 else None,
        temperature=sampling.temperature,
        top_p=sampling.top_p if sampling.top_p != 0 else 1.0,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        priority=request.priority,
    )


def _prompt_fields(request: pdserve_pb2.GenerateRequest) -> dict[str, Any]:
    form = request.WhichOneof("prompt")
    if form == "text":
        return {"text": request.text}
    if form == "token_ids":
        return {"token_ids": list(request.token_ids.ids)}
    if form == "messages":
        chat = request.messages
        turns = [
            ChatTurn(role=turn.role, content=turn.content, name=turn.name or None)
            for turn in chat.messages
        ]
        kwargs = MessageToDict(chat.chat_template_kwargs) if chat.HasField(
            "chat_template_kwargs"
        ) else {}
        return {"messages": turns, "chat_template_kwargs": kwargs}
    return {}
