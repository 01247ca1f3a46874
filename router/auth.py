"""Securing the public gRPC port: bearer tokens checked by an interceptor, and TLS credentials.

`load_public_security(config.security)` runs once when the router builds its server: it reads
the token file and the PEM files (each size-checked first), and turns every problem into a
`ConfigError` naming the key. The result holds the interceptors and the server credentials the
router passes to `grpc.aio.server` and `add_secure_port`.

Every method needs `authorization: Bearer <token>` call metadata except the health service's,
so load balancers and Kubernetes probes work without a secret. Unknown methods are rejected
like known ones, so a caller without a token learns nothing about which methods exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pdserve.config import SecurityConfig
from pdserve.errors import ConfigError

logger = logging.getLogger(__name__)

# Services callable without a token (health probes carry no secrets).
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
MIN_TOKEN_CHARS = 16
# gRPC's default metadata budget is 8 KiB per call; a longer token could never be sent.
MAX_TOKEN_CHARS = 4096
# Token and PEM files are small; anything bigger is a wrong path, refused before reading.
MAX_SECRET_FILE_BYTES = 1024 * 1024

MISSING_TOKEN = "missing bearer token: send call metadata 'authorization: Bearer <token>'"
WRONG_SCHEME = "authorization metadata must use the Bearer scheme: 'Bearer <token>'"
INVALID_TOKEN = "invalid bearer token"

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


@dataclass(frozen=True)
class PublicSecurity:
    """What the router's servers need: interceptors (empty: open API) and TLS credentials
    (None: plaintext) for gRPC; the same bearer-token check and PEM files for the HTTP API."""

    interceptors: tuple[grpc.aio.ServerInterceptor, ...]
    credentials: grpc.ServerCredentials | None
    # The token check both APIs share (None: open API).
    bearer: BearerTokenInterceptor | None = None
    # (certificate chain, private key) PEM paths, already checked (None: plaintext).
    tls_files: tuple[str, str] | None = None

    @property
    def auth_required(self) -> bool:
        return bool(self.interceptors)

    @property
    def tls(self) -> bool:
        return self.tls_files is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context for the HTTP API from the same files (None: plaintext)."""
        if self.tls_files is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self.tls_files, password=lambda: b"")
        return context


def load_public_security(config: SecurityConfig) -> PublicSecurity:
    """Reads the token and PEM files named by `config` (blocks on file I/O; called once by the
    router at start). Raises ConfigError naming the key of any unreadable or invalid file."""
    bearer = None
    if config.api_tokens_file is not None:
        bearer = BearerTokenInterceptor(read_api_tokens(config.api_tokens_file))
    credentials = None
    tls_files = None
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        credentials = read_tls_credentials(config.tls_cert_file, config.tls_key_file)
        tls_files = (config.tls_cert_file, config.tls_key_file)
    interceptors = (bearer,) if bearer is not None else ()
    return PublicSecurity(interceptors, credentials, bearer, tls_files)


def read_api_tokens(path: str) -> tuple[str, ...]:
    """The tokens in `path`, one a line; blank lines and `#` comment lines are skipped.

    Raises ConfigError naming `security.api_tokens_file` (and the line number, never the
    token) when the file is unreadable, holds no token, or a token is too short, too long or
    not visible ASCII."""
    key = "security.api_tokens_file"
    data = _read_bounded(path, key)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key} ({path}): not UTF-8 text") from None
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        problem = _token_problem(token)
        if problem is not None:
            raise ConfigError(f"{key} ({path}) line {number}: {problem}")
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"{key} ({path}): no tokens (only blank or comment lines)")
    return tuple(tokens)


def read_tls_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """Server credentials from a PEM certificate chain and its unencrypted private key.

    Checks with the `ssl` module that both parse and that the key matches the certificate
    (gRPC would only fail later with "Failed to bind"). Raises ConfigError naming the key."""
    cert_pem = _read_bounded(cert_file, "security.tls_cert_file")
    key_pem = _read_bounded(key_file, "security.tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password makes an encrypted key fail here instead of prompting on stdin.
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"security.tls_cert_file ({cert_file}) and security.tls_key_file ({key_file}): "
            f"not a PEM certificate chain and its matching unencrypted private key ({exc})"
        ) from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <one of the tokens>` metadata.

    Runs on the router's event loop for every incoming call, before the request is parsed;
    never blocks. A rejected call ends with UNAUTHENTICATED and a message that never repeats
    what the caller sent. Holds only SHA-256 digests of the tokens: comparing fixed-size
    digests with `hmac.compare_digest`, against every token without stopping at a match,
    keeps the check's time independent of which token matched and of the tokens' lengths.
    """

    def __init__(
        self, tokens: Iterable[str], open_services: frozenset[str] = OPEN_SERVICES
    ) -> None:
        self._digests = tuple(_digest(token) for token in tokens)
        if not self._digests:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._open_services = open_services
        self.num_rejected = 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if _service_of(method) in self._open_services:
            return await continuation(handler_call_details)
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        self.num_rejected += 1
        logger.debug("rejected %s: %s", method, problem)
        return _rejecting_handler(await continuation(handler_call_details), problem)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None when `metadata` carries one valid bearer token, else why not (safe to show)."""
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return MISSING_TOKEN if not values else INVALID_TOKEN
        scheme, _, credential = values[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return WRONG_SCHEME
        presented = _digest(credential.strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(digest, presented)
        return None if matched else INVALID_TOKEN


def _rejecting_handler(
    handler: grpc.RpcMethodHandler | None, problem: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED.

    It has no request deserializer: the unauthenticated request is never parsed."""

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


def _service_of(method: str) -> str:
    """The service of a method path: `/pdserve.v1.Generation/Info` -> `pdserve.v1.Generation`."""
    return method.lstrip("/").partition("/")[0]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _token_problem(token: str) -> str | None:
    if len(token) < MIN_TOKEN_CHARS:
        return f"a token must have at least {MIN_TOKEN_CHARS} characters (got {len(token)})"
    if len(token) > MAX_TOKEN_CHARS:
        return f"a token must have at most {MAX_TOKEN_CHARS} characters (got {len(token)})"
    if not all("!" <= char <= "~" for char in token):
        return "a token must be visible ASCII without spaces (it travels as gRPC metadata)"
    return None


def _read_bounded(path: str, key: str) -> bytes:
    """The bytes of a small file; ConfigError naming `key` if unreadable or too big."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{key} ({path}): larger than {MAX_SECRET_FILE_BYTES} bytes")
    if not data.strip():
        raise ConfigError(f"{key} ({path}): the file is empty")
    return data
