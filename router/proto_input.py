"""`pdserve.v1.GenerateRequest` -> `GenerateInput`, with the gRPC API's own defaults.

gRPC defaults are proto3's zeros: temperature 0 (greedy), top_p 0 meaning 1, no seed unless
set. `max_tokens` is required on this API (an unset `sampling` is an error naming it).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict

from pdserve.errors import InvalidArgument
from pdserve.v1 import pdserve_pb2
from router.generate_input import ChatTurn, GenerateInput


def input_from_proto(request: pdserve_pb2.GenerateRequest) -> GenerateInput:
    """The request in pdserve's terms; raises `InvalidArgument` for what only the proto form
    can get wrong (no sampling). Every other check is `router.validation`'s."""
    if not request.HasField("sampling"):
        raise InvalidArgument("sampling.max_tokens", "required (sampling is not set)")
    sampling = request.sampling
    return GenerateInput(
        **_prompt_fields(request),
        max_tokens=sampling.max_tokens,
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
