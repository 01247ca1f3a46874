"""Cancel and deadlines at each stage of a request: during prefill, during the KV hand-off
(between prefill and decode), and mid-decode. Injected delays hold the request in the stage
(fault injection), so the stage is known; afterwards nothing is left on any worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, make_request
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, load_reports, wait_for

TARGET = 333
# Prefill takes >= 2 s, the hand-off >= 3 s more (one late chunk), decode 0.2 s a step.
SLOW_PROMPT = [TARGET] + list(range(20, 60))
STAGE_DEADLINES = {"prefill": 1.0, "hand-off": 3.5, "decode": 7.0}


@pytest.fixture(scope="module")
def staged_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    config = make_config(
        str(tiny_model_dir),
        kv_transfer={"chunk_bytes": 16384},
        faults={
            "target_token_id": TARGET, "prefill_delay_s": 2.0, "kv_chunk_fault": "delay",
            "kv_chunk_fault_seq": 1, "kv_chunk_delay_s": 3.0, "decode_step_delay_s": 0.2,
        },
    )
    with Service(config) as running:
        yield running


def slow_call(client: GenerationClient, timeout_s: float):
    request = make_request(SLOW_PROMPT, max_tokens=60, ignore_eos=True)
    return client._stub.Generate(request, timeout=timeout_s)


@pytest.mark.parametrize("stage", ["prefill", "hand-off", "decode"])
def test_cancel_at_each_stage_frees_everything(staged_service: Service, stage: str) -> None:
    with GenerationClient(staged_service.address) as client:
        call = slow_call(client, 60)
        if stage == "prefill":
            # The prefill replica holds the request: inside the injected 2 s prefill stall.
            wait_for(
                lambda: any(
                    report.role == "prefill" and report.num_active_requests
                    for report in load_reports(staged_service)
                ),
                "the prefill replica to hold the request",
            )
        else:
            next(call)  # the first token: prefill is done, the hand-off is under way
            if stage == "decode":
                next(call)  # a decode token: the hand-off is done
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert_quiet(staged_service)


@pytest.mark.parametrize("stage", sorted(STAGE_DEADLINES))
def test_deadline_at_each_stage_frees_everything(staged_service: Service, stage: str) -> None:
    received = 0
    client = GenerationClient(staged_service.address)
    with client, pytest.raises(grpc.RpcError) as caught:
        for response in slow_call(client, STAGE_DEADLINES[stage]):
            received += len(response.token_ids)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    expected_tokens = {"prefill": 0, "hand-off": 1}.get(stage)
    if expected_tokens is not None:
        assert received == expected_tokens
    else:
        assert received > 1
    assert_quiet(staged_service)
