"""The protocol a benchmark speaks to its server, chosen by `--backend`.

`grpc` drives pdserve's router (`pdserve.v1.Generation/Generate`, see `grpc_backend`);
`openai-chat` and `openai-completions` drive any OpenAI-compatible HTTP server: pdserve's own
HTTP API, vLLM, llama.cpp's `llama-server`, `transformers serve` (see `openai_client`). The
workloads, the runner, the statistics and the charts are the same for all three.

`open_backend` is the factory; it imports the chosen implementation on use, so grpc.aio is not
loaded for an HTTP run, nor aiohttp and tokenizers for a gRPC one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from pdserve.bench.options import GRPC, BenchOptions
from pdserve.bench.records import RequestRecord
from pdserve.bench.workload import RequestShape

Clock = Callable[[], float]  # seconds since the benchmark started


class Backend(Protocol):
    """One connection to the server (a channel or an HTTP session), owned by `open_backend`
    and used on its event loop only. `stream` may run from many tasks at once."""

    @property
    def request_form(self) -> dict[str, Any]:
        """How requests are sent, for results.json: the API, the prompt form and whether
        `ignore_eos` is sent."""
        ...

    async def describe(self) -> dict[str, Any]:
        """The server's facts for results.json; always has "model" and "max_context_tokens"
        (None when the server does not say). Raises PdserveError (or grpc.RpcError) when the
        server cannot be asked."""
        ...

    async def stream(self, record: RequestRecord, shape: RequestShape, clock: Clock) -> None:
        """Sends `shape` and fills `record`: `send_s` once the request is built, each
        token-carrying message as it arrives, the outcome, then `end_s`. A failed request is
        recorded with its status and message, never raised; cancellation propagates."""
        ...


@asynccontextmanager
async def open_backend(options: BenchOptions) -> AsyncIterator[Backend]:
    """Opens the backend `options.backend` names on the running loop and closes it on exit.

    Raises InvalidArgument for an unreadable CA file or tokenizer, and (openai-*) PdserveError
    when the model cannot be discovered.
    """
    if options.backend == GRPC:
        from pdserve.bench.grpc_backend import open_grpc_backend

        async with open_grpc_backend(options) as grpc_backend:
            yield grpc_backend
    else:
        from pdserve.bench.openai_client import open_openai_backend

        async with open_openai_backend(options) as openai_backend:
            yield openai_backend
