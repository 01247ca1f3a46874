"""The router's OpenAI-compatible HTTP server (aiohttp), on the same event loop as gRPC.

Life cycle: `start()` binds `router.host:router.http_port` (TLS with the public port's
certificate when configured) and serves; `stop()` (after the router drained the front door)
stops accepting and closes the connections left. aiohttp was chosen because it is made to be
embedded in an already running asyncio loop (an `AppRunner` beside grpc.aio's server, no
signal handlers taken over), cancels a handler when its client disconnects (which aborts the
request on every replica) and bounds request bodies itself; the load generator uses its
client too.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /v1/models/{id}` need the bearer token when `security.api_tokens_file` is set;
`GET /health` (200 only while the service is SERVING, else 503) and `GET /version` never do.
Every error is OpenAI's error object; two middlewares own that mapping and the token check.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from pdserve.config import PdserveConfig
from pdserve.messages import ModelInfo
from pdserve.metrics import RouterMetrics
from router.auth import PublicSecurity
from router.front_door import FrontDoor
from router.http.endpoints import OpenAIEndpoints
from router.http.errors import HttpError, HttpErrorResponse

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths anyone may call (probes carry no secrets).
OPEN_PATHS = frozenset({"/health", "/version"})


class HttpServer:
    def __init__(
        self,
        config: PdserveConfig,
        front_door: FrontDoor,
        security: PublicSecurity,
        model_info: ModelInfo,
        metrics: RouterMetrics,
        is_serving: Callable[[], bool],
        version: str,
    ) -> None:
        self._security = security
        self._is_serving = is_serving
        self._version = version
        self._endpoints = OpenAIEndpoints(
            front_door, config.model.served_name, model_info.model, metrics
        )
        self._max_body_bytes = config.limits.max_request_bytes
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Binds and serves; returns the bound port (`port` 0 picks a free one)."""
        runner = web.AppRunner(self._app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        sock = _bound_socket(host, port)
        site = web.SockSite(runner, sock, ssl_context=self._security.ssl_context())
        await site.start()
        self._runner = runner
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stops accepting and closes every connection (handlers still running are
        cancelled, which aborts their requests)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._max_body_bytes,
            middlewares=[self._errors, self._auth],
        )
        endpoints = self._endpoints
        app.router.add_post("/v1/chat/completions", endpoints.chat_completions)
        app.router.add_post("/v1/completions", endpoints.completions)
        app.router.add_get("/v1/models", endpoints.list_models)
        app.router.add_get("/v1/models/{model_id:.+}", endpoints.get_model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version_info)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        if self._is_serving():
            return web.Response(status=200)
        return web.Response(status=503, text="NOT_SERVING")

    async def _version_info(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self._version})

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpErrorResponse as exc:
            return _error_response(exc.error)
        except web.HTTPRequestEntityTooLarge:
            return _error_response(HttpError(
                413, f"the body exceeds the {self._max_body_bytes}-byte limit "
                "(limits.max_request_bytes)", "invalid_request_error", None, "request_too_large",
            ))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error_response(
                HttpError(exc.status, f"{request.method} {request.path}: {exc.reason}",
                          "invalid_request_error", None, exc.reason.lower().replace(" ", "_"))
            )
        except Exception:
            logger.exception("HTTP %s %s failed", request.method, request.path)
            return _error_response(
                HttpError(500, "internal server error", "server_error", None, "internal")
            )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        bearer = self._security.bearer
        if bearer is None or request.path in OPEN_PATHS:
            return await handler(request)
        headers = [("authorization", value) for value in request.headers.getall(
            "Authorization", []
        )]
        problem = bearer.check(headers)
        if problem is not None:
            raise HttpErrorResponse(
                HttpError(401, problem, "authentication_error", None, "invalid_api_key")
            )
        return await handler(request)


def _error_response(error: HttpError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def _bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to host:port (IPv4 or IPv6, as `host` resolves)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock
