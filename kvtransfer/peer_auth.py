"""Authentication (and optional TLS) between prefill and decode replicas on the KV port.

Every KV call carries a shared internal token in `x-pdserve-kv-token` metadata; the receiver
checks it in constant time before any handler runs. The token is minted by `pdserve serve` at
start and reaches replicas only inside their config (over Ray's authenticated channel): public
clients never hold it, and the public API does not accept it. With TLS files configured, the
KV port serves TLS and senders verify it against the CA.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

TOKEN_METADATA_KEY = "x-pdserve-kv-token"


class KVTokenInterceptor(grpc.ServerInterceptor):
    """Rejects KV calls without the right internal token (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        offered = [
            value for key, value in (handler_call_details.invocation_metadata or ())
            if key == TOKEN_METADATA_KEY
        ]
        digest = hashlib.sha256(offered[0].encode() if len(offered) == 1 else b"").digest()
        if len(offered) == 1 and hmac.compare_digest(digest, self._digest):
            return continuation(handler_call_details)
        return _refusal(handler_call_details)


def _refusal(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid KV peer token")

    if details.method.endswith("/Push"):
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds the token to every call of a sender's channel."""

    def __init__(self, token: str) -> None:
        self._metadata = ((TOKEN_METADATA_KEY, token),)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = tuple(details.metadata or ()) + self._metadata
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def server_interceptors(token: str | None) -> list[grpc.ServerInterceptor]:
    return [KVTokenInterceptor(token)] if token else []


def secure_channel(
    address: str, options: list[tuple[str, Any]], token: str | None, tls_ca_file: str | None
) -> grpc.Channel:
    """A channel to a KV receiver: TLS when a CA is given, the token on every call."""
    if tls_ca_file:
        credentials = grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes())
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _TokenMetadata(token))
    return channel


def bind(server: grpc.Server, target: str, cert_file: str | None, key_file: str | None) -> int:
    """Binds the KV port, with TLS when both files are given; returns the port (0: failed)."""
    if cert_file and key_file:
        credentials = grpc.ssl_server_credentials(
            [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())]
        )
        return server.add_secure_port(target, credentials)
    return server.add_insecure_port(target)
