"""`Info` describes the running service; health is SERVING only while both pools have a live
replica, and a service without a decode replica says so (UNAVAILABLE), never hangs."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_info_reports_model_pools_transport_and_mode(tiny_service: Service) -> None:
    with GenerationClient(tiny_service.address, timeout_s=30) as client:
        info = client.info()
    assert info.mode == "disaggregated" and info.kv_transport == "auto"
    assert info.dtype == "float32"
    assert info.model == tiny_service.config.model.source
    assert info.prefill.configured_replicas == 1 and info.decode.configured_replicas == 2
    assert sorted(r.replica_id for r in info.decode.replicas) == ["decode-0", "decode-1"]
    for replica in [*info.prefill.replicas, *info.decode.replicas]:
        assert replica.state == pdserve_pb2.REPLICA_STATE_READY
        assert replica.num_total_blocks > 0 and replica.node_id
    assert info.max_context_tokens == 512 and info.kv_block_size == 16


def test_health_is_serving(tiny_service: Service) -> None:
    with grpc.insecure_channel(tiny_service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service_name in ("", "pdserve.v1.Generation"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=10)
            assert reply.status == SERVING


def test_losing_the_decode_pool_turns_health_off_and_requests_unavailable(
    ray_cluster: None, tiny_model_dir: Path
) -> None:
    with Service(make_config(str(tiny_model_dir))) as service:
        with grpc.insecure_channel(service.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )
            assert next(watch).status == SERVING
            ray.kill(service.decode_actors["decode-0"], no_restart=True)
            assert next(watch).status == NOT_SERVING
            watch.cancel()
        with GenerationClient(service.address, timeout_s=30) as client:
            with pytest.raises(grpc.RpcError) as caught:
                collect(client.generate([1, 2, 3], max_tokens=4))
            info = client.info()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode" in caught.value.details()
    assert info.decode.replicas[0].state == pdserve_pb2.REPLICA_STATE_DEAD
