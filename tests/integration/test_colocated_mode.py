"""`mode: colocated` through the whole system: Info and health show the colocated pool (and no
disaggregated one), and cancel, deadline, bad input, KV exhaustion and a replica dying
mid-stream end right and leave no request or block behind on any replica; `pdserve bench
serve` drives this mode as it drives the other."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM

from pdserve import cli
from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config
from tests.integration.colocated_oracle import assert_colocated_quiet, colocated_reports
from tests.integration.conftest import wait_for
from tests.integration.test_bad_input import CASES

TARGET = 333  # prompts starting with this token id run slowly (fault injection), on purpose
SLOW_STEP_S = 0.1
LONG = dict(max_tokens=128, ignore_eos=True)


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    # 1 MiB of KV per replica = 85 blocks of 16 tokens for the tiny model (768 bytes per token).
    config = make_config(
        str(tiny_model_dir), mode="colocated",
        colocated={
            "replicas": 2, "resources": {"num_cpus": 1}, "max_prefill_tokens_per_step": 32,
            "kv_cache": {"memory_mb": 1, "block_size": 16},
        },
        faults={"target_token_id": TARGET, "decode_step_delay_s": SLOW_STEP_S},
    )
    with Service(config) as running:
        yield running


def test_info_shows_the_colocated_pool_and_no_disaggregated_one(service: Service) -> None:
    with GenerationClient(service.address, timeout_s=30) as client:
        info = client.info()
    assert (info.mode, info.kv_transport, info.kv_block_size) == ("colocated", "none", 16)
    assert not info.HasField("prefill") and not info.HasField("decode")
    assert info.colocated.configured_replicas == 2
    assert sorted(r.replica_id for r in info.colocated.replicas) == ["colocated-0", "colocated-1"]
    for replica in info.colocated.replicas:
        assert replica.state == pdserve_pb2.REPLICA_STATE_READY
        assert replica.num_total_blocks == 85 and replica.node_id
    assert {r.role for r in colocated_reports(service)} == {"colocated"}
    assert service.prefill_actors == {} and service.decode_actors == {}


def test_health_is_serving(service: Service) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service_name in ("", "pdserve.v1.Generation"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cancel_mid_stream_frees_everything(service: Service) -> None:
    with GenerationClient(service.address) as client:
        call = client._stub.Generate(make_request(list(range(3, 80)), **LONG), timeout=60)
        received = [next(call) for _ in range(3)]
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert sum(len(r.token_ids) for r in received) == 3
    assert_colocated_quiet(service)


def test_short_deadline_is_deadline_exceeded_and_frees_everything(service: Service) -> None:
    with GenerationClient(service.address) as client:
        call = client._stub.Generate(make_request(list(range(10, 300)), **LONG), timeout=0.1)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_colocated_quiet(service)


@pytest.mark.parametrize("name,request_message,field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_invalid_argument_and_holds_nothing(
    service: Service, name: str, request_message: pdserve_pb2.GenerateRequest, field: str
) -> None:
    with GenerationClient(service.address) as client, pytest.raises(grpc.RpcError) as caught:
        collect(client._stub.Generate(request_message, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field), caught.value.details()
    assert_colocated_quiet(service)


def test_kv_exhaustion_on_every_replica_waits_in_the_queue(service: Service) -> None:
    # On-demand admission: a 360-token prompt takes 24 blocks with its margin, so 3 fit in each
    # replica's 85 and the 7th and 8th requests wait in the router's queue. The admitted ones
    # are slowed down (fault injection) so they still hold their blocks meanwhile.
    prompt = [TARGET, *range(20, 379)]
    with GenerationClient(service.address, timeout_s=120) as client:
        calls = [client._stub.Generate(make_request(prompt, **LONG), timeout=120)
                 for _ in range(8)]
        for call in calls:
            _read_in_background(call)
        wait_for(lambda: client.info().num_queued_requests >= 1, "a request queued for room")
        for call in calls:
            call.cancel()
    wait_for(lambda: _queued(service) == 0, "the queue to empty")
    assert_colocated_quiet(service)
    with GenerationClient(service.address, timeout_s=60) as client:
        assert len(collect(client.generate(prompt, max_tokens=4, ignore_eos=True)).token_ids) == 4


def _read_in_background(call: grpc.Call) -> None:
    """Starts a call (it begins on its first read); how it ends is checked by other means."""

    def read() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()


def _queued(service: Service) -> int:
    with GenerationClient(service.address, timeout_s=30) as client:
        return client.info().num_queued_requests


def test_bench_serve_targets_the_colocated_service(service: Service, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # Sized for this service's small KV caches (85 blocks each) however slow the machine is:
    # 2 short requests (<= 5 blocks each) plus one 100-token prompt (7 blocks) every 5 s.
    argv = [
        "bench", "serve", "--address", service.address, "--concurrency", "2",
        "--num-requests", "6", "--prompt-len", "uniform:8:64", "--output-len", "fixed:8",
        "--vocab-low", "3", "--vocab-high", "300", "--mix", "--long-every", "5",
        "--long-start", "0", "--long-prompt-len", "100", "--long-output-len", "fixed:4",
        "--seed", "3", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    server = results["server"]
    assert (server["mode"], server["kv_transport"]) == ("colocated", "none")
    assert server["num_colocated_replicas"] == 2 and server["num_prefill_replicas"] == 0
    assert results["summary"]["num_failed"] == 0
    for record in results["requests"]:
        assert record["status"] == "OK", record
        assert record["served_by"]["mode"] == "colocated"
        assert record["served_by"]["kv_transport"] == "none"
    assert_colocated_quiet(service)


def test_replica_death_mid_stream_migrates_without_duplicate_or_gap(
    service: Service, tiny_model_dir: Path
) -> None:
    prompt = [TARGET, *range(40, 80)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=1,
        eos_token_id=None,
    )[0, len(prompt):].tolist()
    with GenerationClient(service.address, timeout_s=120) as client:
        stream = client.generate(prompt, max_tokens=24, ignore_eos=True)
        received: list[int] = []
        for response in stream:
            received.extend(response.token_ids)
            if len(received) >= 5:
                break
        victim = _replica_holding_a_request(service)
        epoch = next(r.epoch for r in colocated_reports(service) if r.replica_id == victim)
        ray.kill(service.colocated_actors[victim], no_restart=False)
        final = None
        for response in stream:
            received.extend(response.token_ids)
            final = response.final if response.HasField("final") else final
    assert received == expected  # no duplicate, no gap
    assert final is not None and final.served_by.num_migrations == 1
    assert final.served_by.decode_replica not in ("", victim)
    _wait_for_restart(service, victim, epoch)
    assert_colocated_quiet(service)


def _replica_holding_a_request(service: Service) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [r.replica_id for r in colocated_reports(service) if r.num_active_requests]
        if busy:
            return busy[0]
        time.sleep(0.02)  # polling interval of a bounded wait
    raise AssertionError("no colocated replica holds the request")


def _wait_for_restart(service: Service, replica_id: str, old_epoch: str) -> None:
    """Ray restarts the killed replica (a new epoch); later tests get both replicas back."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        epochs = {r.replica_id: r.epoch for r in colocated_reports(service)}
        if epochs.get(replica_id, old_epoch) != old_epoch:
            return
        time.sleep(0.2)  # polling interval of a bounded wait
    raise AssertionError(f"{replica_id} was not restarted")
