"""Answering one generation request over HTTP: a whole JSON response or a server-sent stream.

Both run the request through `FrontDoor.generate` and send it through a `ClientStream`
(`router.client_stream`: a bounded buffer, a stalled client cancelled after
`timeouts.client_stall_s`, drain cuts). A stream is opened only once the first token is there,
so everything that fails before (admission, placement, prefill) is an HTTP status with OpenAI's
error object; an error after that is sent as a final `data: {"error": ...}` event, then
`data: [DONE]`. The stream sends, per choice, an opening update (chat: the role), its text
updates with the finish reason on the last, then one usage chunk when asked
(`stream_options.include_usage`), then `data: [DONE]`. A choice cut by a drain ends with
finish reason `abort` (what vLLM reports for an aborted request) and its usage, the stream
with `[DONE]`. A client that reads nothing for `client_stall_s` has its request cancelled and
its connection aborted (the stream ends without `[DONE]`). However the handler ends (finished,
failed, client gone and the handler cancelled), the generator is closed, which aborts every
choice's work on the replicas before the handler returns. Both return the response and what
the request counts as in `pdserve_router_requests_total`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pdserve.errors import Internal, PdserveError
from pdserve.messages import TokenLogprobs
from router.choices import ChoiceChunk
from router.client_stream import ClientStream, StreamEnd
from router.http.errors import http_error
from router.http.formats import ResponseFormat, usage
from router.request_flow import Completion

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Proxies such as nginx would otherwise buffer the stream.
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"


@dataclass
class GenerationReply:
    """How to answer: the endpoint's format and the client's streaming options."""

    response_format: ResponseFormat
    request_id: str
    stream: bool
    include_usage: bool
    want_logprobs: bool
    # Renames validation's field paths to the endpoint's parameters in error objects.
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class _ChoiceText:
    """What a whole response says about one choice, collected from its chunks."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    completion: Completion | None = None


async def reply_whole(
    chunks: AsyncGenerator[ChoiceChunk, None],
    num_choices: int,
    reply: GenerationReply,
    stream: ClientStream,
) -> tuple[web.Response, str]:
    """Collects every choice, then answers one JSON response."""
    collected = [_ChoiceText() for _ in range(num_choices)]

    async def collect(item: ChoiceChunk) -> None:
        choice = collected[item.index]
        choice.texts.append(item.chunk.text)
        choice.logprobs.extend(item.chunk.logprobs)
        if item.chunk.completion is not None:
            choice.completion = item.chunk.completion

    end = await stream.send(chunks, collect)
    completions = [_finished(choice) for choice in collected]
    fmt = reply.response_format
    choices = [
        fmt.full_choice(
            index, "".join(choice.texts), choice.logprobs if reply.want_logprobs else None,
            completion,
        )
        for index, (choice, completion) in enumerate(zip(collected, completions))
    ]
    response = web.json_response(
        fmt.response(choices, usage(completions)),
        headers={"x-request-id": reply.request_id},
        dumps=_dumps,
    )
    return response, end.outcome


async def reply_stream(
    request: web.Request,
    chunks: AsyncGenerator[ChoiceChunk, None],
    reply: GenerationReply,
    stream: ClientStream,
) -> tuple[web.StreamResponse, str]:
    """Streams server-sent events; raises (before sending anything) what fails before the
    first token."""
    response = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": reply.request_id})
    events = _EventStream(request, response, reply)
    closing: list[dict[str, Any]] = []
    try:
        end = await stream.send(chunks, events.send)
    except PdserveError as exc:
        if not response.prepared:
            raise
        closing.append(http_error(exc, reply.params).body())
        outcome = exc.code.value
    else:
        if end is StreamEnd.STALLED:
            _abort_connection(request)
            return response, end.outcome
        if not response.prepared:
            raise Internal("the request ended without output")
        if reply.include_usage:
            closing.append(reply.response_format.usage_chunk(usage(events.completions())))
        outcome = end.outcome
    if not await stream.write_within_stall(events.close(closing)):
        _abort_connection(request)
    return response, outcome


def _abort_connection(request: web.Request) -> None:
    """Drops the connection of a client that stopped reading (closing it would wait for the
    data it does not read)."""
    if request.transport is not None:
        request.transport.abort()


class _EventStream:
    """Writes one request's choices as server-sent events; the response is prepared (its
    headers sent) with the first event."""

    def __init__(
        self, request: web.Request, response: web.StreamResponse, reply: GenerationReply
    ) -> None:
        self._request = request
        self._response = response
        self._reply = reply
        self._fmt = reply.response_format
        self._opened: set[int] = set()
        self._completions: dict[int, Completion] = {}

    async def send(self, item: ChoiceChunk) -> None:
        if not self._response.prepared:
            await self._response.prepare(self._request)
        if item.index not in self._opened:
            self._opened.add(item.index)
            opening = self._fmt.start_choice(item.index)
            if opening is not None:
                await self.event(self._fmt.chunk(opening))
        chunk = item.chunk
        if chunk.completion is not None:
            self._completions[item.index] = chunk.completion
        logprobs = chunk.logprobs if self._reply.want_logprobs else None
        update = self._fmt.delta_choice(item.index, chunk.text, logprobs, chunk.completion)
        await self.event(self._fmt.chunk(update))

    def completions(self) -> list[Completion]:
        return [self._completions[index] for index in sorted(self._completions)]

    async def event(self, payload: dict[str, Any]) -> None:
        await self._response.write(b"data: " + _dumps(payload).encode("utf-8") + b"\n\n")

    async def close(self, payloads: list[dict[str, Any]]) -> None:
        """Sends the closing events (usage, an error), then `[DONE]`, and ends the body."""
        for payload in payloads:
            await self.event(payload)
        await self._response.write(_DONE)
        await self._response.write_eof()


def _finished(choice: _ChoiceText) -> Completion:
    if choice.completion is None:
        raise Internal("a choice ended without its final message")
    return choice.completion


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
