"""Damaged KV on the wire (corrupted, dropped, duplicated or late chunks, injected after the
checksums): the transfer fails on both sides, the request ends with an explicit status and
never decodes on partial KV, bystanders finish correctly, and nothing leaks."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet
from tests.integration.test_replica_failures import reference

TARGET = 333
TARGET_PROMPT = [TARGET] + list(range(20, 60))
BYSTANDERS = [[11, 12, 13], [40, 41, 42, 43]]
MAX_TOKENS = 8

CASES = {
    # fault -> (config overrides, expected status)
    "corrupt": ({"kv_chunk_fault": "corrupt"}, grpc.StatusCode.DATA_LOSS),
    "drop": ({"kv_chunk_fault": "drop"}, grpc.StatusCode.DATA_LOSS),
    "duplicate": ({"kv_chunk_fault": "duplicate"}, grpc.StatusCode.DATA_LOSS),
    "late": ({"kv_chunk_fault": "delay", "kv_chunk_delay_s": 3.0},
             grpc.StatusCode.DEADLINE_EXCEEDED),
}


@pytest.mark.parametrize("fault", sorted(CASES))
def test_damaged_transfer_fails_cleanly(ray_cluster: None, tiny_model_dir: Path, fault: str):
    overrides, expected_status = CASES[fault]
    config = make_config(
        str(tiny_model_dir),
        # Small chunks: the target's KV travels in several, so the fault hits mid-stream.
        kv_transfer={"chunk_bytes": 16384, "timeout_s": 1.0},
        faults={"target_token_id": TARGET, "kv_chunk_fault_seq": 1, **overrides},
    )
    expected = [reference(tiny_model_dir, p, MAX_TOKENS) for p in BYSTANDERS]
    results: dict[int, object] = {}
    with Service(config) as service:

        def run(index: int, prompt: list[int]) -> None:
            with GenerationClient(service.address, timeout_s=60) as client:
                try:
                    results[index] = collect(
                        client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
                    ).token_ids
                except grpc.RpcError as err:
                    results[index] = err

        threads = [
            threading.Thread(target=run, args=(i, p))
            for i, p in enumerate([TARGET_PROMPT, *BYSTANDERS])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        failure = results[0]
        assert isinstance(failure, grpc.RpcError), failure
        assert failure.code() == expected_status, failure.details()
        assert [results[1], results[2]] == expected
        assert_quiet(service)
        with GenerationClient(service.address, timeout_s=60) as client:
            again = collect(client.generate(BYSTANDERS[0], max_tokens=MAX_TOKENS, ignore_eos=True))
        assert again.token_ids == expected[0]
