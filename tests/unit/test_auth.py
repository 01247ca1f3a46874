"""The bearer-token interceptor, reading token and PEM files, and the CLI token flags."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pdserve import cli
from pdserve.config import SecurityConfig
from pdserve.errors import ConfigError
from router import auth
from router.auth import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    WRONG_SCHEME,
    BearerTokenInterceptor,
    load_public_security,
    read_api_tokens,
    read_tls_credentials,
)

TOKENS = ("first-token-0123456789", "second-token-abcdefghij", "third-token-ABCDEFGHIJ")
GENERATE = "/pdserve.v1.Generation/Generate"
INFO = "/pdserve.v1.Generation/Info"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass
class Details:
    """Stands in for grpc.HandlerCallDetails."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


async def _servicer_method(request: Any, context: Any) -> None:
    raise AssertionError("the real method must not run")


# What the router's generic handler returns for each method.
REAL_HANDLERS = {
    GENERATE: grpc.unary_stream_rpc_method_handler(_servicer_method),
    INFO: grpc.unary_unary_rpc_method_handler(_servicer_method),
    HEALTH_CHECK: grpc.unary_unary_rpc_method_handler(_servicer_method),
}


def _intercept(interceptor: BearerTokenInterceptor, details: Details) -> Any:
    async def continuation(call_details: Any) -> Any:
        return REAL_HANDLERS.get(call_details.method)

    return asyncio.run(interceptor.intercept_service(continuation, details))


def _rejection(handler: Any) -> FakeContext:
    """Runs a rejecting handler's behaviour; returns the context it aborted."""
    behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
    context = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(behaviour(b"request bytes", context))
    return context


def _bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("user-agent", "test"), ("authorization", value))


def test_missing_header_is_unauthenticated() -> None:
    interceptor = BearerTokenInterceptor(TOKENS)
    handler = _intercept(interceptor, Details(GENERATE, (("user-agent", "test"),)))
    assert handler is not REAL_HANDLERS[GENERATE]
    # Same kind as the real method, and the unauthenticated request is never parsed.
    assert handler.response_streaming and not handler.request_streaming
    assert handler.request_deserializer is None
    context = _rejection(handler)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.details == MISSING_TOKEN
    assert interceptor.num_rejected == 1


def test_wrong_scheme_is_unauthenticated_and_not_echoed() -> None:
    interceptor = BearerTokenInterceptor(TOKENS)
    handler = _intercept(interceptor, Details(INFO, _bearer(f"Basic {TOKENS[0]}")))
    assert not handler.response_streaming
    context = _rejection(handler)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.details == WRONG_SCHEME
    assert TOKENS[0] not in context.details


@pytest.mark.parametrize(
    "value",
    [
        "Bearer wrong-token-0123456789",
        f"Bearer {TOKENS[0]}x",
        f"Bearer {TOKENS[0][:-1]}",
        "Bearer ",
        "Bearer",
    ],
)
def test_wrong_token_is_unauthenticated_and_not_echoed(value: str) -> None:
    context = _rejection(
        _intercept(BearerTokenInterceptor(TOKENS), Details(GENERATE, _bearer(value)))
    )
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.details == INVALID_TOKEN
    presented = value.removeprefix("Bearer").strip()
    assert not presented or presented not in context.details


def test_two_authorization_headers_are_refused() -> None:
    metadata = (("authorization", f"Bearer {TOKENS[0]}"), ("authorization", "Bearer other"))
    context = _rejection(_intercept(BearerTokenInterceptor(TOKENS), Details(GENERATE, metadata)))
    assert context.details == INVALID_TOKEN


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("method", [GENERATE, INFO])
def test_any_configured_token_passes(token: str, method: str) -> None:
    interceptor = BearerTokenInterceptor(TOKENS)
    assert (
        _intercept(interceptor, Details(method, _bearer(f"Bearer {token}")))
        is (REAL_HANDLERS[method])
    )
    assert interceptor.num_rejected == 0


def test_scheme_is_case_insensitive() -> None:
    details = Details(GENERATE, _bearer(f"bearer {TOKENS[1]}"))
    assert _intercept(BearerTokenInterceptor(TOKENS), details) is REAL_HANDLERS[GENERATE]


def test_every_token_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bool] = []
    compare_digest = hmac.compare_digest

    def counting_compare(a: bytes, b: bytes) -> bool:
        result = compare_digest(a, b)
        compared.append(result)
        return result

    monkeypatch.setattr(auth.hmac, "compare_digest", counting_compare)
    interceptor = BearerTokenInterceptor(TOKENS)
    assert interceptor.check(_bearer(f"Bearer {TOKENS[0]}")) is None
    assert compared == [True, False, False]


def test_health_passes_without_a_token() -> None:
    interceptor = BearerTokenInterceptor(TOKENS)
    assert _intercept(interceptor, Details(HEALTH_CHECK)) is REAL_HANDLERS[HEALTH_CHECK]
    assert interceptor.num_rejected == 0


def test_unknown_method_without_token_is_unauthenticated_not_unimplemented() -> None:
    handler = _intercept(BearerTokenInterceptor(TOKENS), Details("/pdserve.v1.Generation/Nope"))
    assert _rejection(handler).code == grpc.StatusCode.UNAUTHENTICATED


def test_interceptor_needs_a_token() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        BearerTokenInterceptor([])


def _write(tmp_path: Path, text: str, name: str = "tokens") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_token_file_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, f"# ops team\n\n  {TOKENS[0]}  \n# old: revoked\n{TOKENS[1]}\n")
    assert read_api_tokens(path) == TOKENS[:2]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the file is empty"),
        ("\n  \n", "the file is empty"),
        ("# only a comment\n\n", "no tokens"),
        (f"{TOKENS[0]}\nshort-secret\n", "line 2: a token must have at least 16 characters"),
        ("has a space in it 0123456789\n", "line 1: a token must be visible ASCII"),
        ("caf\u00e9-token-0123456789\n", "line 1: a token must be visible ASCII"),
        ("x" * 4097 + "\n", "line 1: a token must have at most 4096 characters"),
    ],
)
def test_bad_token_file_names_the_key(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        read_api_tokens(path)
    message = str(caught.value)
    assert message.startswith("security.api_tokens_file") and problem in message
    assert "short-secret" not in message and "space in it" not in message


def test_unreadable_token_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"security.api_tokens_file: cannot read .*absent"):
        read_api_tokens(str(tmp_path / "absent"))


def test_oversized_token_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, (TOKENS[0] + "\n") * (auth.MAX_SECRET_FILE_BYTES // 20))
    with pytest.raises(ConfigError, match="security.api_tokens_file .* larger than"):
        read_api_tokens(path)


def test_garbage_pem_names_both_keys(tmp_path: Path) -> None:
    cert = _write(tmp_path, "not a certificate\n", "cert.pem")
    key = _write(tmp_path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "k")
    with pytest.raises(ConfigError) as caught:
        read_tls_credentials(cert, key)
    message = str(caught.value)
    assert "security.tls_cert_file" in message and "security.tls_key_file" in message


def test_missing_key_file_names_its_key(tmp_path: Path) -> None:
    cert = _write(tmp_path, "not a certificate\n", "cert.pem")
    with pytest.raises(ConfigError, match="security.tls_key_file: cannot read"):
        read_tls_credentials(cert, str(tmp_path / "absent.key"))


def test_open_api_has_no_interceptor_and_no_tls() -> None:
    security = load_public_security(SecurityConfig())
    assert security.interceptors == () and security.credentials is None
    assert not security.auth_required


def test_tokens_file_turns_auth_on(tmp_path: Path) -> None:
    security = load_public_security(SecurityConfig(api_tokens_file=_write(tmp_path, TOKENS[2])))
    (interceptor,) = security.interceptors
    assert security.auth_required and security.credentials is None
    assert isinstance(interceptor, BearerTokenInterceptor)
    assert interceptor.check(_bearer(f"Bearer {TOKENS[2]}")) is None
    assert interceptor.check(_bearer(f"Bearer {TOKENS[0]}")) == INVALID_TOKEN


def test_cli_token_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    assert cli.resolve_token(None) is None
    monkeypatch.setenv(cli.TOKEN_ENV, "")
    assert cli.resolve_token(None) is None
    monkeypatch.setenv(cli.TOKEN_ENV, TOKENS[0])
    assert cli.resolve_token(None) == TOKENS[0]
    assert cli.resolve_token(TOKENS[1]) == TOKENS[1]


@pytest.mark.parametrize("command", ["generate", "info"])
def test_cli_unreadable_tls_ca_exits_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--tls-ca", str(tmp_path / "absent.pem")]
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "hi"] if command == "generate" else argv)
    assert caught.value.code == 2
    assert "--tls-ca: cannot read" in capsys.readouterr().err
