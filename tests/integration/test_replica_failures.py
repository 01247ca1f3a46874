"""Replica death and stalls under a request: retry before the first token, migrate (or fail,
by config) after it, catch a stalled replica by its missed polls, and never disturb bystanders.
Faults are aimed with the built-in fault injection (`faults.target_token_id`), not timing luck."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, load_reports

TARGET = 333  # prompts starting with this token id get the injected faults
TARGET_PROMPT = [TARGET, 5, 6, 7, 8]
BYSTANDER_PROMPTS = [[11, 12, 13], [40, 41, 42, 43], [7, 7, 7, 7, 7, 7]]
MAX_TOKENS = 24


def reference(model_dir: Path, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=1,
        eos_token_id=None,
    )
    return out[0, len(prompt):].tolist()


def wait_for_replica_holding_a_request(service: Service, role: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [r for r in load_reports(service) if r.role == role and r.num_active_requests]
        if busy:
            return busy[0].replica_id
        time.sleep(0.02)  # polling interval of a bounded wait
    raise AssertionError(f"no {role} replica took the request")


def start_stream(address: str, prompt: list[int]):
    client = GenerationClient(address, timeout_s=120)
    return client, client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture
def service_factory(ray_cluster: None, tiny_model_dir: Path) -> Iterator:
    started: list[Service] = []

    def start(**overrides: object) -> Service:
        config = make_config(str(tiny_model_dir), **overrides)
        service = Service(config)
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def test_prefill_death_before_first_token_retries_elsewhere(service_factory, tiny_model_dir):
    service = service_factory(
        prefill={"replicas": 2}, faults={"target_token_id": TARGET, "prefill_delay_s": 2.0}
    )
    expected = reference(tiny_model_dir, TARGET_PROMPT)
    result: dict = {}
    client, stream = start_stream(service.address, TARGET_PROMPT)
    worker = threading.Thread(target=lambda: result.update(r=collect(stream)))
    worker.start()
    victim = wait_for_replica_holding_a_request(service, "prefill")
    ray.kill(service.prefill_actors[victim], no_restart=True)
    worker.join(timeout=120)
    client.close()
    final = result["r"].final
    assert result["r"].token_ids == expected
    assert final.served_by.prefill_replica != victim
    assert_quiet(service)


@pytest.mark.parametrize("policy", ["migrate", "fail"])
def test_decode_death_mid_stream(service_factory, tiny_model_dir, policy: str) -> None:
    service = service_factory(
        decode={"replicas": 2},
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.1},
        reliability={"on_decode_failure": policy},
    )
    expected = reference(tiny_model_dir, TARGET_PROMPT)
    client, stream = start_stream(service.address, TARGET_PROMPT)
    received = []
    for response in stream:
        received.extend(response.token_ids)
        if len(received) >= 5:
            break
    victim = wait_for_replica_holding_a_request(service, "decode")
    ray.kill(service.decode_actors[victim], no_restart=True)
    if policy == "fail":
        with pytest.raises(grpc.RpcError) as caught:
            for response in stream:
                received.extend(response.token_ids)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"after {len(received)} tokens were sent" in caught.value.details()
        assert received == expected[: len(received)]
    else:
        final = None
        for response in stream:
            received.extend(response.token_ids)
            final = response.final if response.HasField("final") else final
        assert received == expected  # no duplicate, no gap
        assert final.served_by.num_migrations == 1
        assert final.served_by.decode_replica != victim
    client.close()
    assert_quiet(service)


@pytest.mark.parametrize("stall_s,migrates", [(4.0, True), (0.3, False)])
def test_stalled_decode_replica(service_factory, tiny_model_dir, stall_s: float, migrates: bool):
    """SIGSTOP: Ray never reports the replica dead; the router's polls notice it. A pause
    shorter than the poll timeout is no failure."""
    service = service_factory(
        decode={"replicas": 2},
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.05},
        timeouts={"load_poll_interval_s": 0.2, "load_poll_timeout_s": 1.5},
    )
    expected = reference(tiny_model_dir, TARGET_PROMPT)
    client, stream = start_stream(service.address, TARGET_PROMPT)
    received = []
    for response in stream:
        received.extend(response.token_ids)
        if len(received) >= 3:
            break
    victim = wait_for_replica_holding_a_request(service, "decode")
    pid = next(r.pid for r in load_reports(service) if r.replica_id == victim)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(stall_s)  # the stall being injected, not a synchronisation
    finally:
        os.kill(pid, signal.SIGCONT)
    final = None
    for response in stream:
        received.extend(response.token_ids)
        final = response.final if response.HasField("final") else final
    client.close()
    assert received == expected
    assert (final.served_by.num_migrations == 1) is migrates
    assert_quiet(service)


def test_request_failing_inside_a_decode_step_leaves_bystanders(service_factory, tiny_model_dir):
    service = service_factory(faults={"target_token_id": TARGET, "fail_decode_step": True})
    expected = [reference(tiny_model_dir, p) for p in BYSTANDER_PROMPTS]
    results: dict = {}

    def run(index: int, prompt: list[int]) -> None:
        with GenerationClient(service.address, timeout_s=120) as client:
            try:
                results[index] = collect(
                    client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
                ).token_ids
            except grpc.RpcError as err:
                results[index] = err

    prompts = [TARGET_PROMPT, *BYSTANDER_PROMPTS]
    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(results[0], grpc.RpcError)
    assert results[0].code() == grpc.StatusCode.INTERNAL
    assert "injected fault" in results[0].details()
    assert [results[i] for i in range(1, 4)] == expected
    assert_quiet(service)


def test_dead_replica_is_restarted_and_rejoins_with_a_new_epoch(service_factory, tiny_model_dir):
    service = service_factory()
    [before] = [r for r in load_reports(service) if r.role == "decode"]
    ray.kill(service.decode_actors["decode-0"], no_restart=False)
    deadline = time.monotonic() + 180
    while True:
        reports = [r for r in load_reports(service) if r.role == "decode"]
        if reports and reports[0].epoch != before.epoch:
            break
        assert time.monotonic() < deadline, "the decode replica was not restarted"
        time.sleep(0.2)  # polling interval of a bounded wait
    assert reports[0].pid != before.pid
    expected = reference(tiny_model_dir, BYSTANDER_PROMPTS[0])
    deadline = time.monotonic() + 30
    while True:  # the router's next poll sees the new replica
        with GenerationClient(service.address, timeout_s=60) as client:
            try:
                result = collect(
                    client.generate(BYSTANDER_PROMPTS[0], max_tokens=MAX_TOKENS, ignore_eos=True)
                )
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)  # polling interval of a bounded wait
    assert result.token_ids == expected
    assert_quiet(service)
