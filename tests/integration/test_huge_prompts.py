"""Huge prompts cannot stall the router: a text over the character bound is refused before it is
tokenized, one under it is tokenized off the event loop, and under a flood of either every
health check and `Info` call still answers within a second (an orchestrator's probe)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from router.validation import max_prompt_chars
from tests.factories.config import make_config
from tests.factories.model import build_tiny_model_dir
from tests.factories.tokenizer import CORPUS, train_byte_level_tokenizer
from tests.integration.conftest import assert_quiet

# A generous context, so the character bound (context x longest token x 2, about 850k characters
# for the tiny tokenizer) sits below the 1 MiB request cap with room for real tokenizing under it.
CONTEXT_TOKENS = 32_768
NUM_PROMPTS = 8
PROBE_TIMEOUT_S = 1.0
CALL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def long_context_service(
    ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-long-context"), "llama")
    hf_config_path = model_dir / "config.json"
    hf_config = json.loads(hf_config_path.read_text())
    hf_config["max_position_embeddings"] = CONTEXT_TOKENS  # rotary: no weight depends on it
    hf_config_path.write_text(json.dumps(hf_config))
    config = make_config(str(model_dir), model={"max_context_tokens": CONTEXT_TOKENS})
    with Service(config) as service:
        yield service


def prompt_text(num_chars: int) -> str:
    """English text: ASCII, so its characters are its bytes (the request cap counts bytes)."""
    text = " ".join(CORPUS[:3]) + " "
    return (text * (num_chars // len(text) + 1))[:num_chars]


def char_bound(service: Service) -> int:
    assert service.router is not None
    front_door = service.router.front_door
    assert front_door is not None and front_door.max_context_tokens == CONTEXT_TOKENS
    return max_prompt_chars(front_door.tokenizer, CONTEXT_TOKENS)


def flood_while_probing(
    service: Service, text: str
) -> tuple[list[grpc.RpcError], list[str], int, float]:
    """Sends `NUM_PROMPTS` Generate calls with `text` at once while probing health and `Info`
    on their own channel, each with a 1 s timeout, until every call ended. Returns the calls'
    errors, the probes that failed, how many probes ran and how long the flood took."""
    request = pdserve_pb2.GenerateRequest(
        text=text, sampling=pdserve_pb2.SamplingParams(max_tokens=4)
    )

    def generate() -> grpc.RpcError | None:
        with grpc.insecure_channel(service.address) as channel:
            try:
                list(pdserve_pb2_grpc.GenerationStub(channel).Generate(
                    request, timeout=CALL_TIMEOUT_S
                ))
            except grpc.RpcError as error:
                return error
        return None

    failed_probes: list[str] = []
    num_probes = 0
    with grpc.insecure_channel(service.address) as probe_channel, ThreadPoolExecutor(
        NUM_PROMPTS
    ) as clients:
        health = health_pb2_grpc.HealthStub(probe_channel)
        generation = pdserve_pb2_grpc.GenerationStub(probe_channel)
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)  # connected
        started = time.monotonic()
        calls: list[Future[grpc.RpcError | None]] = [
            clients.submit(generate) for _ in range(NUM_PROMPTS)
        ]
        while not all(call.done() for call in calls):
            num_probes += 1
            try:
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
                )
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    failed_probes.append(f"health {reply.status}")
                generation.Info(pdserve_pb2.InfoRequest(), timeout=PROBE_TIMEOUT_S)
            except grpc.RpcError as error:
                failed_probes.append(f"{error.code().name}: {error.details()}")
            time.sleep(0.05)  # probe period
        flood_s = time.monotonic() - started
        errors = [call.result() for call in calls]
    assert all(error is not None for error in errors), "every prompt is refused"
    return [error for error in errors if error is not None], failed_probes, num_probes, flood_s


def test_prompts_over_the_character_bound_are_refused_without_tokenizing(
    long_context_service: Service,
) -> None:
    service = long_context_service
    limit = char_bound(service)
    text = prompt_text(service.config.limits.max_request_bytes - 1024)
    assert len(text) > limit, "precondition: the prompts are over the bound"
    started = time.perf_counter()
    num_tokens = len(train_byte_level_tokenizer().encode(text).ids)
    encode_s = time.perf_counter() - started
    assert num_tokens > CONTEXT_TOKENS

    errors, failed_probes, _, flood_s = flood_while_probing(service, text)

    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("prompt.text: ") and str(limit) in error.details()
    assert failed_probes == []
    # Tokenizing them (as the router once did, on its event loop) would take NUM_PROMPTS times
    # this; refusing all of them takes less than tokenizing one.
    assert flood_s < encode_s, (flood_s, encode_s)
    assert_quiet(service)


def test_prompts_under_the_bound_are_tokenized_while_probes_still_answer(
    long_context_service: Service,
) -> None:
    service = long_context_service
    text = prompt_text(char_bound(service) - 1000)

    errors, failed_probes, num_probes, flood_s = flood_while_probing(service, text)

    for error in errors:
        # Tokenized for real: refused by the token count, not by the character bound.
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("prompt: "), error.details()
        assert "prompt tokens leave no room" in error.details()
    assert failed_probes == [], f"{len(failed_probes)} of {num_probes} probes failed"
    assert num_probes >= 3, f"the flood took only {flood_s:.2f} s: the probes barely overlapped"
    assert_quiet(service)
