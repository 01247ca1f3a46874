"""How streams end when their clients stop reading or run out of time. Clients that stop
reading do not pin decode KV: a gRPC client that grants no HTTP/2 flow-control window, and an
SSE client that never reads its socket, each have their request cancelled after
`timeouts.client_stall_s` (counted in `pdserve_router_client_stalls_total`), the request's work
on the replicas is aborted, and a request running beside them finishes with the reference
output. A client whose deadline passes mid-stream is counted as DEADLINE_EXCEEDED. The slow
requests' decode steps are slowed (fault injection) so that they could not have finished by
themselves first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.factories.stalled_clients import StalledGrpcCall, unread_http_request
from tests.integration.conftest import assert_quiet, load_reports, wait_for
from tests.integration.test_replica_failures import reference
from tests.unit.test_metrics import value

# Prompts starting with TARGET decode slowly (config `faults`).
TARGET = 333
SLOW_PROMPT = [TARGET, 9, 8, 7]
BYSTANDER_PROMPT = [5, 17, 42, 99]
MAX_TOKENS = 48
GENERATE = "/pdserve.v1.Generation/Generate"


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    config = make_config(
        str(tiny_model_dir),
        limits={"max_tokens": 400, "max_n": 64},
        timeouts={"client_stall_s": 1.0, "reader_slow_s": 0.2},
        router={"max_buffered_messages": 4},
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.05},
    )
    with Service(config) as running:
        yield running


def stalls(service: Service, api: str) -> float:
    assert service.router is not None
    return value(service.router.metrics.registry, "pdserve_router_client_stalls_total", api=api)


def requests(service: Service, status: str) -> float:
    assert service.router is not None
    return value(service.router.metrics.registry, "pdserve_router_requests_total", status=status)


def decoded_tokens(service: Service) -> int:
    return sum(report.total_decode_tokens for report in load_reports(service))


def test_a_grpc_client_granting_no_window_frees_its_decode_kv(
    service: Service, tiny_model_dir: Path
) -> None:
    expected = reference(tiny_model_dir, BYSTANDER_PROMPT, MAX_TOKENS)
    decoded_before = decoded_tokens(service)
    # 128 slowed decode steps would take more than 6 s: far longer than the stall takes.
    slow = make_request(SLOW_PROMPT, max_tokens=128, ignore_eos=True)
    port = int(service.address.rsplit(":", 1)[1])
    with StalledGrpcCall(port, GENERATE, slow.SerializeToString(), window=64) as call:
        with GenerationClient(service.address, timeout_s=120) as client:
            bystander = collect(
                client.generate(BYSTANDER_PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
            )
        wait_for(lambda: stalls(service, "grpc") == 1, "the gRPC stall", timeout_s=60)
        assert call.num_bytes_received <= 64
        assert_quiet(service)  # the stalled request's blocks are free, its call still open
    assert bystander.token_ids == expected
    # The slow request was cut long before its 128 tokens.
    assert decoded_tokens(service) - decoded_before < (MAX_TOKENS - 1) + (128 - 1)


def test_an_sse_client_that_never_reads_is_cancelled_and_dropped(service: Service) -> None:
    # 64 choices of 400 tokens with 20 alternatives each: megabytes of events, more than the
    # kernel buffers of a loopback connection hold (about 2 MiB with the smallest receive
    # buffer), so the router's writes block long before the slowed decode could finish.
    num_choices, max_tokens = 64, 400
    decoded_before = decoded_tokens(service)
    body = json.dumps({
        "prompt": SLOW_PROMPT, "max_tokens": max_tokens, "n": num_choices, "logprobs": 20,
        "ignore_eos": True, "temperature": 0, "stream": True,
    }).encode()
    assert service.router is not None
    sock = unread_http_request(service.router.http_port, "/v1/completions", body)
    try:
        wait_for(lambda: stalls(service, "http") == 1, "the SSE stall", timeout_s=120)
        assert_quiet(service)
        with GenerationClient(service.address, timeout_s=120) as client:
            bystander = collect(client.generate(BYSTANDER_PROMPT, max_tokens=4, ignore_eos=True))
        assert bystander.final.finish_reason
        # The router dropped the connection: what the kernel buffered, then the end, no [DONE].
        sock.settimeout(30)
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK")
        assert not received.endswith(b"data: [DONE]\n\n")
    finally:
        sock.close()
    assert decoded_tokens(service) - decoded_before < num_choices * (max_tokens - 1)
    assert_quiet(service)


def test_deadlines_passing_mid_stream_count_as_deadline_exceeded(service: Service) -> None:
    # Tokens flow (a slowed step every 50 ms, so 400 of them cannot finish within the 1 s
    # deadline on any machine) when the deadline passes: grpc cancels the handler then, at the
    # moment the request flow's own deadline check would fail it.
    num_requests = 5
    expired_before = requests(service, "DEADLINE_EXCEEDED")
    cancelled_before = requests(service, "CANCELLED")
    with GenerationClient(service.address, timeout_s=1.0) as client:
        for _ in range(num_requests):
            stream = client.generate(SLOW_PROMPT, max_tokens=400, ignore_eos=True)
            assert next(stream).token_ids  # the first token came before the deadline
            with pytest.raises(grpc.RpcError) as caught:
                collect(stream)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(
        lambda: requests(service, "DEADLINE_EXCEEDED") == expired_before + num_requests,
        "the expired requests to be counted", timeout_s=30,
    )
    assert requests(service, "CANCELLED") == cancelled_before
    assert_quiet(service)
