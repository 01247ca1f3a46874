"""Graceful drain: on stop, health goes NOT_SERVING, new requests are refused, and streams in
flight finish completely before the service exits; streams still running when the grace ends
are cut with a proper final message (gRPC FINISH_REASON_CANCELLED, HTTP finish reason `abort`
and `[DONE]`), their work on the replicas aborted."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet
from tests.integration.test_replica_failures import reference

TARGET = 333
SLOW_PROMPT = [TARGET, 9, 8, 7]
MAX_TOKENS = 12


def test_stop_drains_streams_in_flight(ray_cluster: None, tiny_model_dir: Path) -> None:
    config = make_config(
        str(tiny_model_dir),
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.15},
        timeouts={"drain_grace_s": 60.0},
    )
    expected = reference(tiny_model_dir, SLOW_PROMPT, MAX_TOKENS)
    service = Service(config)
    service.start()
    client = GenerationClient(service.address, timeout_s=120)
    stream = client.generate(SLOW_PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = next(stream)
    channel = grpc.insecure_channel(service.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=60
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=service.stop)
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    late_client = GenerationClient(service.address, timeout_s=30)
    with late_client, pytest.raises(grpc.RpcError) as caught:
        collect(late_client.generate([5, 6, 7], max_tokens=4))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in caught.value.details()
    rest = collect(stream)
    assert list(first.token_ids) + rest.token_ids == expected
    assert rest.final is not None
    stopper.join(timeout=120)
    assert not stopper.is_alive()
    watch.cancel()
    channel.close()
    client.close()


def test_streams_running_when_the_grace_ends_get_a_cancelled_final(
    ray_cluster: None, tiny_model_dir: Path
) -> None:
    config = make_config(
        str(tiny_model_dir),
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.1},
        timeouts={"drain_grace_s": 0.5},
    )
    # 64 slowed decode steps take more than 6 s: both streams outlive the 0.5 s grace.
    max_tokens = 64
    with Service(config) as service, GenerationClient(service.address, timeout_s=120) as client:
        stream = client.generate(SLOW_PROMPT, max_tokens=max_tokens, ignore_eos=True)
        first = next(stream)
        assert service.router is not None
        sse = http.client.HTTPConnection("127.0.0.1", service.router.http_port, timeout=60)
        body = {"prompt": SLOW_PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        sse.request("POST", "/v1/completions", json.dumps(body),
                    {"Content-Type": "application/json"})
        response = sse.getresponse()
        assert response.status == 200
        events = [response.readline()]
        while not events[-1].startswith(b"data: "):  # the first event: the stream is running
            events = [response.readline()]
        # The same drain `Service.stop` runs, on the router's loop, so that the replicas can
        # be checked afterwards (a stop would kill them).
        drain = service.router.front_door.drain(config.timeouts.drain_grace_s)
        loop = service._loop  # the router's event loop
        assert loop is not None
        assert not asyncio.run_coroutine_threadsafe(drain, loop).result(timeout=60)
        rest = collect(stream)
        events += [line for line in iter(response.readline, b"") if line.startswith(b"data: ")]
        sse.close()
        assert_quiet(service)  # the cut aborted both requests' work on the replicas

    final = rest.final
    assert final is not None
    assert final.finish_reason == pdserve_pb2.FINISH_REASON_CANCELLED
    assert final.request_id
    assert final.usage.prompt_tokens == len(SLOW_PROMPT)
    assert final.usage.completion_tokens == len(first.token_ids) + len(rest.token_ids)
    assert 0 < final.usage.completion_tokens < max_tokens

    assert events[-1] == b"data: [DONE]\n"
    chunks = [json.loads(line.removeprefix(b"data: ")) for line in events[:-1]]
    *updates, last, usage_chunk = chunks
    (choice,) = last["choices"]
    assert choice["finish_reason"] == "abort"
    assert choice["pdserve"]["request_id"]
    assert all(c["finish_reason"] is None for u in updates for c in u["choices"])
    assert 0 < usage_chunk["usage"]["completion_tokens"] < max_tokens
