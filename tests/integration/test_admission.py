"""Admission and abandoned clients: over capacity with the router's queue full (here: no queue)
is RESOURCE_EXHAUSTED at once, and a client process killed without cancelling leaves nothing
behind on any worker. (Waiting in the queue: tests/integration/test_router_queue.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet

TARGET = 333  # prompts starting with it get a slow decode step (fault injection)
SLOW_PROMPT = [TARGET, 1, 2, 3]


@pytest.fixture(scope="module")
def slow_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    config = make_config(
        str(tiny_model_dir),
        router={"max_inflight_requests": 2, "max_queued_requests": 0},
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.2},
    )
    with Service(config) as running:
        yield running


def test_over_router_capacity_is_resource_exhausted_quickly(slow_service: Service) -> None:
    with GenerationClient(slow_service.address, timeout_s=60) as client:
        running = [
            client._stub.Generate(
                make_request(SLOW_PROMPT, max_tokens=100, ignore_eos=True),
                timeout=60,
            )
            for _ in range(2)
        ]
        for call in running:
            next(call)  # both admitted and streaming
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            collect(client.generate([5, 6], max_tokens=4))
        refused_in = time.monotonic() - started
        for call in running:
            call.cancel()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in caught.value.details()
    assert refused_in < 5.0, "a refusal must not wait for capacity"
    assert_quiet(slow_service)
    with GenerationClient(slow_service.address, timeout_s=60) as client:
        assert len(collect(client.generate([5, 6], max_tokens=4, ignore_eos=True)).token_ids) == 4


CLIENT_SCRIPT = """
import sys
from pdserve.client import GenerationClient
client = GenerationClient(sys.argv[1])
for response in client.generate([int(t) for t in sys.argv[2:]], max_tokens=100, ignore_eos=True):
    print("token", flush=True)
"""


def test_killed_client_process_frees_everything(slow_service: Service) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, slow_service.address, *map(str, SLOW_PROMPT)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "token"  # streaming has begun
    finally:
        client.kill()  # SIGKILL: no cancel is ever sent
        client.wait(timeout=30)
    assert_quiet(slow_service)
