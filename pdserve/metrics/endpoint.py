"""A process's own metrics registry and the HTTP server that exposes it."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from pdserve.errors import FailedPrecondition

logger = logging.getLogger(__name__)

_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


class MetricsEndpoint:
    """Owns one `CollectorRegistry` and, after `serve()`, the HTTP server exposing it.

    Subclasses register their metrics on `self.registry`. Recording is thread-safe (the
    prometheus client locks each metric); `serve()` and `stop()` are called by the owner only.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # "host:port" of `/metrics` once served, else "".
        self.address = ""
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int, key: str, advertised_host: str = "127.0.0.1") -> str:
        """Serves `/metrics` on `host:port` (0 = a free port) on a daemon thread; returns the
        address others reach it at (a wildcard host is shown as `advertised_host`). Does not
        block. Raises FailedPrecondition naming the config `key` when the port cannot be
        bound."""
        assert self._server is None, "serve() runs once"
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise FailedPrecondition(
                f"{key}: cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._server = server
        shown = advertised_host if host in _WILDCARDS else host
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        self.address = f"{shown}:{server.server_port}"
        return self.address

    def stop(self) -> None:
        """Stops the HTTP server, if any (blocks up to its 0.5 s poll interval); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
