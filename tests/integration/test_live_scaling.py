"""Live scaling of a running service under a background stream of requests: `Admin.Scale`
grows both pools (new replicas join only once loaded), then shrinks them while requests run on
the replicas being removed (they drain: no new placements, in-flight requests finish). No
request fails, every output equals the reference model's, Info and the metrics follow the
sizes, and nothing leaks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import ray

from pdserve.client import GenerationClient, GenerationResult, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, load_reports, wait_for
from tests.integration.test_replica_failures import reference

TARGET = 333  # prompts starting with it decode slowly (fault injection): they stay in flight
SLOW_PROMPTS = [[TARGET, 5, 6, 7], [TARGET, 9, 10, 11, 12]]
FAST_PROMPTS = [[11, 12, 13], [40, 41, 42, 43], [7, 7, 7, 7, 7, 7], [100, 101]]
MAX_TOKENS = 16
DECODE_STEP_DELAY_S = 0.15  # x 16 tokens: a slow request runs ~2.4 s
WAIT_S = 120.0
READY = pdserve_pb2.REPLICA_STATE_READY
STARTING = pdserve_pb2.REPLICA_STATE_STARTING
DRAINING = pdserve_pb2.REPLICA_STATE_DRAINING


@dataclass
class Outcome:
    prompt: list[int]
    result: GenerationResult
    finished_at: float


class BackgroundLoad:
    """Threads that stream prompts back to back until stopped, recording every outcome."""

    def __init__(self, address: str, prompt_sets: list[list[list[int]]]) -> None:
        self.outcomes: list[Outcome] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(address, prompts, i), daemon=True)
            for i, prompts in enumerate(prompt_sets)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=WAIT_S)
            assert not thread.is_alive(), "a background stream hangs"

    def served_by(self, replica_id: str, after: float = 0.0) -> int:
        return sum(
            1 for o in list(self.outcomes)
            if o.finished_at > after and replica_id in (
                o.result.final.served_by.prefill_replica, o.result.final.served_by.decode_replica
            )
        )

    def _run(self, address: str, prompts: list[list[int]], offset: int) -> None:
        with GenerationClient(address, timeout_s=WAIT_S) as client:
            count = offset
            while not self._stop.is_set():
                prompt = prompts[count % len(prompts)]
                count += 1
                try:
                    stream = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
                    result = collect(stream)
                except grpc.RpcError as exc:
                    self.failures.append(f"{prompt}: {exc.code().name}: {exc.details()}")
                    continue
                self.outcomes.append(Outcome(prompt, result, time.monotonic()))


def states(client: GenerationClient, role: str) -> dict[str, int]:
    pool = getattr(client.info(), role)
    return {replica.replica_id: replica.state for replica in pool.replicas}


def settled(client: GenerationClient, role: str, num_replicas: int) -> bool:
    pool = getattr(client.info(), role)
    return pool.target_replicas == num_replicas and [r.state for r in pool.replicas] == [
        READY
    ] * num_replicas


def both_decode_replicas_busy(service: Service) -> bool:
    busy = [r for r in load_reports(service) if r.role == "decode" and r.num_active_requests]
    return len(busy) == 2


@pytest.fixture
def service(ray_cluster: None, tiny_model_dir: Path):
    config = make_config(
        str(tiny_model_dir),
        faults={"target_token_id": TARGET, "decode_step_delay_s": DECODE_STEP_DELAY_S},
        timeouts={"drain_grace_s": 60.0},
    )
    running = Service(config)
    running.start()
    yield running
    running.stop()


def test_scale_up_and_down_under_streaming_load(service: Service, tiny_model_dir: Path) -> None:
    expected = {
        tuple(p): reference(tiny_model_dir, p, MAX_TOKENS) for p in SLOW_PROMPTS + FAST_PROMPTS
    }
    load = BackgroundLoad(service.address, [FAST_PROMPTS, SLOW_PROMPTS, SLOW_PROMPTS[::-1]])
    load.start()
    client = GenerationClient(service.address, timeout_s=30)
    try:
        wait_for(lambda: len(load.outcomes) >= 2, "the background stream to run", WAIT_S)

        response = client.scale({"prefill": 2, "decode": 2})
        assert dict(response.previous_target_replicas) == {"prefill": 1, "decode": 1}
        assert dict(response.target_replicas) == {"prefill": 2, "decode": 2}
        # Loading the model takes seconds: the new replicas show up first as STARTING.
        assert states(client, "decode") == {"decode-0": READY, "decode-1": STARTING}
        assert states(client, "prefill") == {"prefill-0": READY, "prefill-1": STARTING}
        wait_for(
            lambda: settled(client, "prefill", 2) and settled(client, "decode", 2), "2 + 2", WAIT_S
        )
        wait_for(
            lambda: load.served_by("prefill-1") and load.served_by("decode-1"),
            "the new replicas to serve requests",
            WAIT_S,
        )

        wait_for(
            lambda: both_decode_replicas_busy(service), "requests on both decode replicas", WAIT_S
        )
        scaled_down_at = time.monotonic()
        handles = {**service.prefill_actors, **service.decode_actors}
        client.scale({"prefill": 1, "decode": 1})
        decode_states = states(client, "decode")
        (victim,) = [rid for rid, state in decode_states.items() if state == DRAINING]
        # The victim drains: it finishes the requests it holds and takes no new ones.
        wait_for(
            lambda: settled(client, "prefill", 1) and settled(client, "decode", 1), "1 + 1", WAIT_S
        )
        assert load.served_by(victim, after=scaled_down_at) >= 1, "no in-flight request finished"
        remaining = {*states(client, "prefill"), *states(client, "decode")}
        assert len(remaining) == 2 and victim not in remaining
        for replica_id in set(handles) - remaining:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(handles[replica_id].load.remote(), timeout=30)
        num_before = len(load.outcomes)
        wait_for(
            lambda: len(load.outcomes) >= num_before + 3, "requests after the scale-down", WAIT_S
        )
    finally:
        load.stop()
        client.close()

    assert load.failures == []
    for outcome in load.outcomes:
        assert outcome.result.token_ids == expected[tuple(outcome.prompt)], outcome.prompt
    metrics = service.router.metrics.registry
    for role in ("prefill", "decode"):
        target = metrics.get_sample_value("pdserve_router_pool_target_replicas", {"role": role})
        ready = metrics.get_sample_value(
            "pdserve_router_pool_replicas", {"role": role, "state": "ready"}
        )
        assert (target, ready) == (1, 1), role
    assert len(assert_quiet(service)) == 2
