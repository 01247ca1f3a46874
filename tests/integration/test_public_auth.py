"""Bearer tokens and TLS on the public ports (gRPC and OpenAI HTTP) of a real service.

With `security.api_tokens_file` set, Generate and Info (and every `/v1` HTTP route) need a
configured token while the health service (and `GET /health`) stays open. With a certificate and
key set, both ports speak TLS only: a client trusting the certificate generates, a plaintext
client or one trusting another CA cannot connect.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve import cli
from pdserve.client import GenerationClient, collect
from pdserve.errors import ConfigError
from pdserve.serve import Service
from router.auth import read_tls_credentials
from tests.factories.config import make_config
from tests.factories.tls import write_pem_pair
from tests.integration.conftest import assert_quiet

TOKENS = ("ops-token-5f1d0c7e9a2b4c68", "ci-token-0b9e8d7c6a5f4e3d")
PROMPT = [1, 2, 3, 4]
NUM_TOKENS = 5


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def token_service(
    ray_cluster: None, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    tokens_file = tmp_path_factory.mktemp("auth") / "tokens"
    tokens_file.write_text(f"# who may call\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    config = make_config(str(tiny_model_dir), security={"api_tokens_file": str(tokens_file)})
    with Service(config) as running:
        yield running


def _generate(client: GenerationClient) -> list[int]:
    result = collect(client.generate(PROMPT, max_tokens=NUM_TOKENS, ignore_eos=True))
    assert result.final is not None
    return result.token_ids


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("token", [None, "not-a-configured-token-42"])
def test_calls_without_a_valid_token_are_unauthenticated(
    token_service: Service, token: str | None
) -> None:
    with GenerationClient(token_service.address, timeout_s=30, token=token) as client:
        for call in (lambda: _generate(client), client.info):
            error = _rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            expected = "missing bearer token" if token is None else "invalid bearer token"
            assert expected in error.details()
            assert token is None or token not in error.details()
    # A rejected call never reached the flow: nothing was admitted or reserved.
    assert_quiet(token_service)


@pytest.mark.parametrize("token", TOKENS)
def test_a_configured_token_generates_and_info_says_auth_is_on(
    token_service: Service, token: str
) -> None:
    with GenerationClient(token_service.address, timeout_s=60, token=token) as client:
        assert len(_generate(client)) == NUM_TOKENS
        assert client.info().auth_required is True
    assert_quiet(token_service)


def test_health_needs_no_token(token_service: Service) -> None:
    with grpc.insecure_channel(token_service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service_name in ("", "pdserve.v1.Generation"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_takes_the_token_from_flag_or_environment(
    token_service: Service, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    info = ["info", "--address", token_service.address]
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    assert cli.main(info) == 1
    assert "error: UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err
    assert cli.main([*info, "--token", TOKENS[1]]) == 0
    assert "replicas" in capsys.readouterr().out
    monkeypatch.setenv(cli.TOKEN_ENV, TOKENS[0])
    argv = ["generate", "--address", token_service.address, "--max-tokens", "3", "hi"]
    assert cli.main(argv) == 0
    assert "completion_tokens=" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pem_pair(tmp_path_factory.mktemp("tls"), "pdserve-test")


@pytest.fixture(scope="module")
def tls_service(
    ray_cluster: None, tiny_model_dir: Path, tls_files: tuple[Path, Path]
) -> Iterator[tuple[Service, list[logging.LogRecord]]]:
    cert, key = tls_files
    config = make_config(
        str(tiny_model_dir), security={"tls_cert_file": str(cert), "tls_key_file": str(key)}
    )
    records = _Records()
    router_logger = logging.getLogger("router.server")
    router_logger.addHandler(records)
    try:
        with Service(config) as running:
            yield running, records.records
    finally:
        router_logger.removeHandler(records)


def test_tls_client_trusting_the_certificate_generates(
    tls_service: tuple[Service, list[logging.LogRecord]], tls_files: tuple[Path, Path]
) -> None:
    service, _ = tls_service
    cert, _ = tls_files
    with GenerationClient(service.address, timeout_s=60, tls_ca_file=str(cert)) as client:
        assert len(_generate(client)) == NUM_TOKENS
        assert client.info().auth_required is False
    assert_quiet(service)


def test_open_api_is_logged_as_a_warning(
    tls_service: tuple[Service, list[logging.LogRecord]],
) -> None:
    _, records = tls_service
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("public API is open" in m and "api_tokens_file" in m for m in warnings)


def test_plaintext_or_untrusting_clients_cannot_connect(
    tls_service: tuple[Service, list[logging.LogRecord]], tmp_path: Path
) -> None:
    service, _ = tls_service
    other_ca, _ = write_pem_pair(tmp_path, "someone-else")
    for tls_ca_file in (None, str(other_ca)):
        with GenerationClient(service.address, timeout_s=10, tls_ca_file=tls_ca_file) as client:
            assert _rpc_error(client.info).code() == grpc.StatusCode.UNAVAILABLE


def test_cli_and_health_over_tls(
    tls_service: tuple[Service, list[logging.LogRecord]],
    tls_files: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    service, _ = tls_service
    cert, _ = tls_files
    argv = ["generate", "--address", service.address, "--tls-ca", str(cert), "--max-tokens", "2"]
    assert cli.main([*argv, "hi"]) == 0
    assert "completion_tokens=" in capsys.readouterr().err
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(service.address, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_http_api_needs_a_configured_token_but_health_does_not(token_service: Service) -> None:
    base_url = token_service.http_base_url
    for token in ("not-a-configured-token-42", TOKENS[0][:-1]):
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=base_url, api_key=token, max_retries=0).completions.create(
                model=token_service.config.model.served_name, prompt=PROMPT, max_tokens=2
            )
        assert caught.value.status_code == 401
    missing = httpx2.post(f"{base_url}/completions", json={"prompt": PROMPT}, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    for token in TOKENS:
        client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
        reply = client.completions.create(
            model=token_service.config.model.served_name, prompt=PROMPT, max_tokens=NUM_TOKENS,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == NUM_TOKENS
    assert httpx2.get(base_url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
    assert_quiet(token_service)


def test_http_api_over_tls_with_the_same_certificate(
    tls_service: tuple[Service, list[logging.LogRecord]], tls_files: tuple[Path, Path]
) -> None:
    service, _ = tls_service
    cert, _ = tls_files
    base_url = service.http_base_url
    assert base_url.startswith("https://")
    trusting = openai.OpenAI(
        base_url=base_url, api_key="unused", max_retries=0,
        http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(cert))),
    )
    stream = trusting.completions.create(
        model=service.config.model.served_name, prompt=PROMPT, max_tokens=NUM_TOKENS,
        stream=True, extra_body={"ignore_eos": True},
    )
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].text) >= 1
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(base_url + "/models", timeout=10)  # does not trust the certificate
    plaintext = base_url.replace("https://", "http://")
    with pytest.raises(httpx2.HTTPError):
        httpx2.get(plaintext + "/models", timeout=10)
    assert_quiet(service)


def test_tls_key_must_match_the_certificate(tmp_path: Path) -> None:
    cert, _ = write_pem_pair(tmp_path, "one")
    _, other_key = write_pem_pair(tmp_path, "two")
    with pytest.raises(ConfigError, match="security.tls_cert_file .* security.tls_key_file"):
        read_tls_credentials(str(cert), str(other_key))
