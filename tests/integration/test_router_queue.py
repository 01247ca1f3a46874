"""The router's queue on a real service: a request that cannot be placed now waits instead of
being refused, in priority order; RESOURCE_EXHAUSTED only when the queue is full; a deadline or
a cancel while queued ends the request at once and leaves nothing anywhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, wait_for

TARGET = 333  # prompts starting with it get a slow decode step (fault injection)
SLOW_PROMPT = [TARGET, 1, 2, 3]
NUM_QUEUED = 10


def drain_in_background(call: grpc.Call) -> None:
    """Starts reading a call (a call begins on its first read); its end, whatever it is, is
    the test's business through other means."""

    def read() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()


def queued(service: Service) -> int:
    with GenerationClient(service.address, timeout_s=30) as client:
        return client.info().num_queued_requests


@pytest.fixture(scope="module")
def one_slot_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    """One request in flight at a time, so everything else queues at the router."""
    config = make_config(
        str(tiny_model_dir),
        router={"max_inflight_requests": 1, "max_queued_requests": NUM_QUEUED + 1},
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.05},
    )
    with Service(config) as running:
        yield running


class Holder:
    """A slow request that holds the only in-flight slot until released."""

    def __init__(self, service: Service) -> None:
        self._client = GenerationClient(service.address, timeout_s=120)
        self._call = self._client._stub.Generate(
            make_request(SLOW_PROMPT, max_tokens=120, ignore_eos=True), timeout=120
        )
        next(self._call)  # admitted and streaming

    def release(self) -> None:
        self._call.cancel()
        self._client.close()


def test_a_priority_request_queued_behind_ten_starts_first(one_slot_service: Service) -> None:
    holder = Holder(one_slot_service)
    finished: list[str] = []
    lock = threading.Lock()

    def run(name: str, prompt: list[int], priority: int) -> None:
        with GenerationClient(one_slot_service.address, timeout_s=120) as client:
            collect(client.generate(prompt, max_tokens=4, ignore_eos=True, priority=priority))
        with lock:
            finished.append(name)

    threads = [
        threading.Thread(target=run, args=(f"normal-{i}", [5, i + 1], 0))
        for i in range(NUM_QUEUED)
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: queued(one_slot_service) == NUM_QUEUED, "ten queued requests")
        urgent = threading.Thread(target=run, args=("urgent", [6, 7], -1))
        urgent.start()
        threads.append(urgent)
        wait_for(lambda: queued(one_slot_service) == NUM_QUEUED + 1, "the urgent one queued")
    finally:
        holder.release()
        for thread in threads:
            thread.join(timeout=120)
    assert finished[0] == "urgent", finished
    assert sorted(finished[1:]) == sorted(f"normal-{i}" for i in range(NUM_QUEUED))
    assert_quiet(one_slot_service)


def test_a_full_queue_is_resource_exhausted_at_once(one_slot_service: Service) -> None:
    holder = Holder(one_slot_service)
    calls = []
    try:
        with GenerationClient(one_slot_service.address, timeout_s=60) as client:
            calls = [
                client._stub.Generate(make_request([5, i + 1], max_tokens=4), timeout=60)
                for i in range(NUM_QUEUED + 1)
            ]
            for call in calls:
                drain_in_background(call)
            wait_for(lambda: queued(one_slot_service) == NUM_QUEUED + 1, "a full queue")
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                collect(client.generate([9, 9], max_tokens=4))
            refused_in = time.monotonic() - started
    finally:
        for call in calls:
            call.cancel()
        holder.release()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in caught.value.details()
    assert refused_in < 5.0, "a full queue refuses without waiting"
    wait_for(lambda: queued(one_slot_service) == 0, "the queue to empty")
    assert_quiet(one_slot_service)


def test_deadline_and_cancel_while_queued_leave_nothing(one_slot_service: Service) -> None:
    holder = Holder(one_slot_service)
    try:
        with GenerationClient(one_slot_service.address, timeout_s=1.0) as client:
            with pytest.raises(grpc.RpcError) as caught:
                collect(client.generate([5, 6], max_tokens=4))
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert queued(one_slot_service) == 0
        with GenerationClient(one_slot_service.address, timeout_s=60) as client:
            call = client._stub.Generate(make_request([5, 7], max_tokens=4), timeout=60)
            drain_in_background(call)
            wait_for(lambda: queued(one_slot_service) == 1, "one queued request")
            call.cancel()
            wait_for(lambda: queued(one_slot_service) == 0, "the cancelled request to leave")
    finally:
        holder.release()
    assert_quiet(one_slot_service)
    with GenerationClient(one_slot_service.address, timeout_s=60) as client:
        assert len(collect(client.generate([5, 6], max_tokens=4, ignore_eos=True)).token_ids) == 4
