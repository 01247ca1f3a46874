"""Cancel, deadline and KV exhaustion: the client gets the right status (a request that finds
the decode cache full waits in the router's queue), and afterwards no KV block, lease or
transfer is left on any worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, wait_for

LONG = dict(max_tokens=128, ignore_eos=True)


def test_cancel_mid_stream_frees_everything(tiny_service: Service) -> None:
    with GenerationClient(tiny_service.address) as client:
        call = client._stub.Generate(client_request([3, 4, 5, 6]), timeout=60)
        received = [next(call) for _ in range(3)]
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert sum(len(r.token_ids) for r in received) == 3
    assert_quiet(tiny_service)


def test_short_deadline_is_deadline_exceeded_and_frees_everything(tiny_service: Service) -> None:
    with GenerationClient(tiny_service.address) as client:
        call = client._stub.Generate(client_request(list(range(10, 300))), timeout=0.1)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_quiet(tiny_service)


def test_stop_token_and_stop_string_end_the_stream(tiny_service: Service) -> None:
    with GenerationClient(tiny_service.address, timeout_s=60) as client:
        free_run = collect(client.generate([5, 6, 7], max_tokens=12, ignore_eos=True))
        stop_id = free_run.token_ids[4]
        stopped = collect(
            client.generate([5, 6, 7], max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
        )
    first_stop = free_run.token_ids.index(stop_id)
    assert stopped.token_ids == free_run.token_ids[: first_stop + 1]
    assert stopped.final.finish_reason == pdserve_pb2.FINISH_REASON_STOP
    assert_quiet(tiny_service)


def client_request(prompt: list[int]) -> pdserve_pb2.GenerateRequest:
    from pdserve.client import make_request

    return make_request(prompt, **LONG)


@pytest.fixture(scope="module")
def small_cache_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    # 1 MiB of decode KV = 85 blocks of 16 tokens for the tiny model (768 bytes per token);
    # `full` reservation takes prompt + max_tokens up front, so the cache fills predictably.
    config = make_config(
        str(tiny_model_dir),
        decode={"kv_cache": {"memory_mb": 1, "block_size": 16, "reservation": "full"}},
    )
    with Service(config) as running:
        yield running


def test_decode_kv_exhaustion_waits_in_the_queue_then_runs(small_cache_service: Service) -> None:
    prompt = list(range(20, 380))  # 360 + 128 tokens = 31 blocks; two fit in 85, three do not
    with GenerationClient(small_cache_service.address, timeout_s=120) as client:
        running = [client._stub.Generate(client_request(prompt), timeout=60) for _ in range(2)]
        for call in running:
            next(call)  # both hold their blocks now
        waiting = client._stub.Generate(client_request(prompt), timeout=60)
        waiting_tokens: list[int] = []
        reader = threading.Thread(
            target=lambda: waiting_tokens.extend(t for r in waiting for t in r.token_ids)
        )
        reader.start()
        wait_for(lambda: client.info().num_queued_requests == 1, "the third request queued")
        running[0].cancel()  # its blocks free up: the queued request is placed
        reader.join(timeout=120)
        running[1].cancel()
    assert len(waiting_tokens) == LONG["max_tokens"]
    assert_quiet(small_cache_service)
