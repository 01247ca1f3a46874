"""Graceful drain: on stop, health goes NOT_SERVING, new requests are refused, and streams in
flight finish completely before the service exits."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.factories.config import make_config
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
