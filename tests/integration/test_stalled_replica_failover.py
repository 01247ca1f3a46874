"""A stalled (SIGSTOPped, not dead) replica with a healthy peer fails no new request: in each
pool, 6 concurrent requests sent while one replica is stopped all finish on the healthy one
with the reference output, well within their deadline.

- decode: the reservation gets no answer within `timeouts.control_call_s`; the attempt goes on
  to the next replica and marks the silent one suspect at once. The load polls' timeout is set
  far longer than the scenario, so only that mark can show it UNRESPONSIVE in `Info`.
- prefill and colocated: the replica stops answering its load polls; the request waiting on it
  is lost there and retried on the peer (`reliability.prefill_retries`).
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, GenerationResult, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from tests.integration.conftest import assert_quiet, load_reports, wait_for
from tests.integration.test_replica_failures import reference, service_factory  # noqa: F401

PROMPTS = [[21 + i, 5, 6, 7, 8] for i in range(6)]
MAX_TOKENS = 12
DEADLINE_S = 30.0


def _generate_all(address: str) -> list[GenerationResult]:
    def one(prompt: list[int]) -> GenerationResult:
        client = GenerationClient(address, timeout_s=DEADLINE_S)
        try:
            return collect(client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True))
        finally:
            client.close()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def _replica_states(address: str, pool: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        info = pdserve_pb2_grpc.GenerationStub(channel).Info(pdserve_pb2.InfoRequest(), timeout=10)
    return {replica.replica_id: replica.state for replica in getattr(info, pool).replicas}


def _stop(service: Service, replica_id: str) -> int:
    pid = next(r.pid for r in load_reports(service) if r.replica_id == replica_id)
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.parametrize(
    "pool,overrides",
    [
        (
            "decode",
            {
                "decode": {"replicas": 2},
                # Polls alone would not see the stall within this test.
                "timeouts": {"control_call_s": 2.0, "load_poll_timeout_s": 120.0},
            },
        ),
        (
            "prefill",
            {"prefill": {"replicas": 2}, "timeouts": {"load_poll_timeout_s": 1.5}},
        ),
        (
            "colocated",
            {
                "mode": "colocated",
                "colocated": {"replicas": 2},
                "timeouts": {"load_poll_timeout_s": 1.5},
            },
        ),
    ],
)
def test_new_requests_finish_on_the_healthy_peer(
    service_factory, tiny_model_dir: Path, pool: str, overrides: dict  # noqa: F811
) -> None:
    service = service_factory(**overrides)
    expected = [reference(tiny_model_dir, prompt, MAX_TOKENS) for prompt in PROMPTS]
    victim = f"{pool}-0"
    pid = _stop(service, victim)
    try:
        results = _generate_all(service.address)
        states = _replica_states(service.address, pool)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [result.token_ids for result in results] == expected
    served_by = {
        "decode": lambda final: final.served_by.decode_replica,
        "prefill": lambda final: final.served_by.prefill_replica,
        "colocated": lambda final: final.served_by.decode_replica,
    }[pool]
    assert {served_by(result.final) for result in results} == {f"{pool}-1"}
    assert states[victim] == pdserve_pb2.REPLICA_STATE_UNRESPONSIVE
    # Once it answers again it serves again, and nothing was left behind anywhere.
    wait_for(
        lambda: _replica_states(service.address, pool)[victim]
        == pdserve_pb2.REPLICA_STATE_READY,
        f"{victim} READY again",
    )
    assert_quiet(service)
