"""The openai-* backends: any OpenAI-compatible HTTP server (pdserve's HTTP API, vLLM,
llama.cpp's `llama-server`, `transformers serve`) driven over one aiohttp session.

Life cycle: `open_openai_backend` loads the chat prompt decoder (`--tokenizer`), opens one
`aiohttp.ClientSession` and resolves the model (`--model`, else the first id of
`GET {base_url}/models`); the session is closed on exit. Its connector has no connection limit:
the runner alone decides how many requests are in flight (a pool limit would queue requests
inside the client and count the wait as TTFT). Each request is one POST answered by a
server-sent-event stream, read by `pdserve.bench.sse` and folded into its record by
`pdserve.bench.openai_stream` (which documents TTFT, the per-chunk gaps and token counts);
the body is then read to its end so the kept-alive connection serves the next request.

`Authorization: Bearer` carries `--api-key`, else the pdserve token. Failures are recorded
like gRPC ones: an HTTP error status as `HTTP_<status>` with the body's error message, an error
event in the stream by its code, the `--timeout` deadline as DEADLINE_EXCEEDED, a connection
failure as UNAVAILABLE, a stream that is not SSE JSON as BAD_STREAM.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp

from pdserve.bench.backends import Clock
from pdserve.bench.openai_requests import RequestBuilder, decoder_for
from pdserve.bench.openai_stream import MAX_ERROR_CHARS, ChunkFolder, error_message, error_object
from pdserve.bench.options import BenchOptions
from pdserve.bench.records import CHUNKS, PENDING, RequestRecord
from pdserve.bench.sse import sse_data
from pdserve.bench.workload import RequestShape
from pdserve.errors import FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable

MODELS_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 1.0  # after [DONE], for the rest of the body
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_MODELS_BODY_BYTES = 4 * 1024 * 1024
BAD_STREAM = "BAD_STREAM"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
UNAVAILABLE = "UNAVAILABLE"
_JSON = {"Content-Type": "application/json"}


class OpenAIBackend:
    """Streams completions or chat completions on `session`; see
    `pdserve.bench.backends.Backend`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        builder: RequestBuilder,
        timeout_s: float | None,
        server: dict[str, Any],
    ) -> None:
        self._session = session
        self._url = base_url + builder.path
        self._builder = builder
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        self._server = server

    @property
    def request_form(self) -> dict[str, Any]:
        return self._builder.form

    async def describe(self) -> dict[str, Any]:
        return dict(self._server)

    async def stream(self, record: RequestRecord, shape: RequestShape, clock: Clock) -> None:
        body = self._builder.body(shape)  # before the clock starts, like the grpc backend
        record.message_unit = CHUNKS  # failed ones too: results.json says what was measured
        record.send_s = clock()
        end_s: float | None = None
        try:
            async with self._session.post(
                self._url, data=body, headers=_JSON, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    await _record_http_error(record, response)
                else:
                    await _read_stream(record, response, clock, self._builder.is_chat)
                end_s = clock()
                await _drain(response)
        except asyncio.TimeoutError:
            _fail(record, DEADLINE_EXCEEDED, f"no end within {self._timeout.total} s")
        except aiohttp.ClientError as exc:
            _fail(record, UNAVAILABLE, str(exc) or type(exc).__name__)
        except ValueError as exc:  # bad JSON, bad UTF-8 or an overlong line
            _fail(record, BAD_STREAM, str(exc))
        finally:
            record.end_s = end_s if end_s is not None else clock()


def _fail(record: RequestRecord, status: str, error: str) -> None:
    record.status = status
    record.error = error[:MAX_ERROR_CHARS]


async def _read_stream(
    record: RequestRecord, response: aiohttp.ClientResponse, clock: Clock, chat: bool
) -> None:
    folder = ChunkFolder(record, chat)
    async for item in sse_data(response.content):
        if folder.add(item, clock() - record.send_s):
            break
    if record.status == PENDING:  # not failed by an error event
        folder.close()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Reads what follows the end of the answer (normally only the end of the chunked body),
    so the connection goes back to the pool for the next request instead of being closed;
    gives up after DRAIN_TIMEOUT_S. Raises nothing: the request's outcome is already set."""
    with suppress(asyncio.TimeoutError, aiohttp.ClientError, ValueError):
        await asyncio.wait_for(_read_to_eof(response), timeout=DRAIN_TIMEOUT_S)


async def _read_to_eof(response: aiohttp.ClientResponse) -> None:
    while await response.content.readany():
        pass


async def _record_http_error(record: RequestRecord, response: aiohttp.ClientResponse) -> None:
    record.status = f"HTTP_{response.status}"
    record.error = _error_text(await _read_body(response, MAX_ERROR_BODY_BYTES))


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """Up to `max_bytes` of the body: a misbehaving server cannot make the client buffer
    an endless answer."""
    parts: list[bytes] = []
    num_bytes = 0
    while num_bytes < max_bytes and (part := await response.content.read(max_bytes - num_bytes)):
        parts.append(part)
        num_bytes += len(part)
    return b"".join(parts)


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style JSON error body, else the body's start."""
    text = body.decode("utf-8", errors="replace")
    try:
        message = error_message(error_object(json.loads(text)))
    except ValueError:
        message = ""
    return message or text[:MAX_ERROR_CHARS]


@asynccontextmanager
async def open_openai_backend(options: BenchOptions) -> AsyncIterator[OpenAIBackend]:
    """An OpenAIBackend for `options` on a fresh session, closed on exit. Raises
    InvalidArgument for an unusable tokenizer or CA file; Unavailable, Unauthenticated or
    FailedPrecondition when the model must be discovered and `/models` does not say it."""
    assert options.base_url is not None, "BenchOptions checks --base-url"
    decode = decoder_for(options)
    base_url = options.base_url.rstrip("/")
    token = options.bearer_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(
        limit=0, force_close=not options.keep_alive, ssl=_ssl_context(options.tls_ca_file)
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        server = await _resolve_model(session, base_url, options.model)
        builder = RequestBuilder(options.backend, server["model"], options.send_ignore_eos, decode)
        yield OpenAIBackend(session, base_url, builder, options.timeout_s, server)


async def _resolve_model(
    session: aiohttp.ClientSession, base_url: str, model: str | None
) -> dict[str, Any]:
    """The server facts: the model (given, else the first listed) and, when listed, its
    context limit (vLLM's `max_model_len`)."""
    if model is not None:
        return {"model": model, "model_source": "--model", "max_context_tokens": None}
    entries = await _list_models(session, f"{base_url}/models")
    first = entries[0]
    max_model_len = first.get("max_model_len")
    return {
        "model": first["id"],
        "model_source": "GET /models (the first listed)",
        "models_listed": [entry["id"] for entry in entries],
        "owned_by": first.get("owned_by"),
        "max_context_tokens": max_model_len if isinstance(max_model_len, int) else None,
    }


async def _list_models(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(MODELS_TIMEOUT_S)) as response:
            body = await _read_body(response, MAX_MODELS_BODY_BYTES)
            status = response.status
    except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
        raise Unavailable(f"GET {url}: {exc or type(exc).__name__}") from None
    if status in (401, 403):
        raise Unauthenticated(f"GET {url}: HTTP {status}: {_error_text(body)} (--api-key?)")
    if status != 200:
        raise Unavailable(f"GET {url}: HTTP {status}: {_error_text(body)} (or pass --model)")
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        data = None
    entries = [e for e in data or [] if isinstance(e, dict) and isinstance(e.get("id"), str)]
    if not entries:
        raise FailedPrecondition(f"GET {url} lists no model id; pass --model")
    return entries


def _ssl_context(ca_file: str | None) -> ssl.SSLContext | bool:
    """Verification against `--tls-ca` when given, else the system's CAs (True)."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument("--tls-ca", f"cannot use {ca_file}: {exc}") from None
