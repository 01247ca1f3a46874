"""The OpenAI-compatible endpoints: thin adapters from JSON to the front door and back.

Each handler parses its body (`router.http.protocol`), checks the model name, builds a
`GenerateInput` (`router.http.inputs`), lets the `FrontDoor` validate it (chat rendering and
tokenizing included) and run it, and answers through `router.http.generation`. Every
`PdserveError` becomes an `HttpErrorResponse` here, with the endpoint's parameter names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdserve.errors import PdserveError, StatusCode
from pdserve.metrics import RouterMetrics
from router.front_door import FrontDoor, new_request_id
from router.generate_input import GenerateInput
from router.http.errors import HttpError, HttpErrorResponse, http_error
from router.http.formats import ChatFormat, CompletionFormat, ResponseFormat
from router.http.generation import GenerationReply, reply_stream, reply_whole
from router.http.inputs import CHAT_PARAMS, COMPLETION_PARAMS, chat_input, completion_input
from router.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    parse_body,
)
from router.validation import ValidatedRequest


@dataclass(frozen=True)
class Endpoint:
    """What differs between the two generation endpoints."""

    body_model: type[SamplingFields]
    # Validation's field paths -> this endpoint's parameter names.
    params: dict[str, str]
    build_input: Callable[[Any], GenerateInput]
    response_format: type[ResponseFormat]
    id_prefix: str
    wants_logprobs: Callable[[Any], bool]


CHAT = Endpoint(
    ChatCompletionRequest, CHAT_PARAMS, chat_input, ChatFormat, "chatcmpl",
    lambda parsed: bool(parsed.logprobs),
)
COMPLETIONS = Endpoint(
    CompletionRequest, COMPLETION_PARAMS, completion_input, CompletionFormat, "cmpl",
    lambda parsed: parsed.logprobs is not None,
)


class OpenAIEndpoints:
    """Handlers of `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

    Lives on the router's event loop; holds no per-request state."""

    def __init__(
        self,
        front_door: FrontDoor,
        model_name: str,
        model_source: str,
        metrics: RouterMetrics,
    ) -> None:
        self._front_door = front_door
        self._model_name = model_name
        self._model_source = model_source
        self._metrics = metrics
        self._created = int(time.time())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self._model_name:
            raise HttpErrorResponse(_unknown_model(model_id))
        return web.json_response(self._model_card())

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        # Unless set below, the handler ended because the client went away (it was cancelled).
        outcome = "CANCELLED"
        try:
            parsed = parse_body(await request.read(), endpoint.body_model)
            if parsed.model is not None and parsed.model != self._model_name:
                raise HttpErrorResponse(_unknown_model(parsed.model))
            validated = await self._front_door.validate(endpoint.build_input(parsed))
            request_id = new_request_id()
            reply = GenerationReply(
                endpoint.response_format(
                    self._front_door.tokenizer, self._model_name,
                    f"{endpoint.id_prefix}-{request_id}",
                ),
                request_id,
                stream=parsed.stream,
                include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
                want_logprobs=endpoint.wants_logprobs(parsed),
                params=endpoint.params,
            )
            response, outcome = await self._answer(request, validated, reply)
            return response
        except PdserveError as exc:
            outcome = exc.code.value
            raise HttpErrorResponse(http_error(exc, endpoint.params)) from None
        except HttpErrorResponse as exc:
            outcome = exc.error.code_name
            raise
        except web.HTTPRequestEntityTooLarge:
            outcome = StatusCode.INVALID_ARGUMENT.value
            raise
        finally:
            self._metrics.count_request(outcome)

    async def _answer(
        self, request: web.Request, validated: ValidatedRequest, reply: GenerationReply
    ) -> tuple[web.StreamResponse, str]:
        """The response and what the request counts as in `pdserve_router_requests_total`."""
        stream = self._front_door.client_stream(validated, reply.request_id, "http")
        # The client stream closes `chunks` however it ends.
        chunks = self._front_door.generate(
            validated, self._front_door.deadline(None), reply.request_id, stream.reader
        )
        if reply.stream:
            return await reply_stream(request, chunks, reply, stream)
        return await reply_whole(chunks, validated.num_choices, reply, stream)

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self._model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "pdserve",
            "root": self._model_source,
            "max_model_len": self._front_door.max_context_tokens,
        }


def _unknown_model(name: str) -> HttpError:
    return HttpError(
        404, f"model: {name[:200]!r} is not served here (GET /v1/models lists it)",
        "invalid_request_error", "model", "model_not_found",
    )
