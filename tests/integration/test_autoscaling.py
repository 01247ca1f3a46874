"""The autoscaler on a running service: a burst of slow requests queues prompts on the single
prefill replica and reserves a large share of the single decode replica's KV blocks, so both
pools grow to their max (2); once the load stops, both shrink back to their min (1) through
the safe drain. Every request succeeds with the reference output; nothing leaks."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import grpc
import pytest

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, wait_for
from tests.integration.test_replica_failures import reference

TARGET = 333  # prompts starting with it get the injected prefill and decode delays
PROMPTS = [[TARGET, 5, 6, 7, 8], [TARGET, 21, 22]]
MAX_TOKENS = 100
NUM_STREAMS = 8
WAIT_S = 150.0
COOLDOWN_S = 2.0
READY = pdserve_pb2.REPLICA_STATE_READY


class InfoRecorder:
    """Samples Info every 0.1 s: (target, READY replicas, all replicas) per pool, in order."""

    def __init__(self, address: str) -> None:
        self.samples: list[dict[str, tuple[int, int, int]]] = []
        self._client = GenerationClient(address, timeout_s=30)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._client.close()

    def seen(self, role: str, target: int, num_ready: int) -> bool:
        return any(sample[role][:2] == (target, num_ready) for sample in list(self.samples))

    def _run(self) -> None:
        while not self._stop.wait(0.1):  # the sampling period
            info = self._client.info()
            self.samples.append(
                {
                    role: (
                        pool.target_replicas,
                        sum(r.state == READY for r in pool.replicas),
                        len(pool.replicas),
                    )
                    for role, pool in (("prefill", info.prefill), ("decode", info.decode))
                }
            )


@pytest.fixture
def service(ray_cluster: None, tiny_model_dir: Path):
    autoscale = {"enabled": True, "min_replicas": 1, "max_replicas": 2, "cooldown_s": COOLDOWN_S}
    config = make_config(
        str(tiny_model_dir),
        # One prompt per forward pass, each delayed: a burst queues up on the prefill replica.
        prefill={
            "max_batch_size": 1,
            "autoscale": {**autoscale, "scale_up_waiting": 2.0, "scale_down_waiting": 0.5},
        },
        decode={
            "kv_cache": {"memory_mb": 1},
            "autoscale": {**autoscale, "scale_up_kv_usage": 0.3, "scale_down_kv_usage": 0.1},
        },
        faults={"target_token_id": TARGET, "prefill_delay_s": 0.4, "decode_step_delay_s": 0.05},
        timeouts={"drain_grace_s": 60.0},
    )
    running = Service(config)
    running.start()
    yield running
    running.stop()


def test_both_pools_follow_the_load_up_and_down(service: Service, tiny_model_dir: Path) -> None:
    expected = {tuple(p): reference(tiny_model_dir, p, MAX_TOKENS) for p in PROMPTS}
    with GenerationClient(service.address, timeout_s=30) as client:
        info = client.info()
    (decode_replica,) = info.decode.replicas
    assert info.decode.autoscale and info.decode.max_replicas == 2
    blocks_per_request = math.ceil((len(PROMPTS[0]) + MAX_TOKENS) / info.kv_block_size)
    num_blocks = decode_replica.num_total_blocks
    assert 0.4 < NUM_STREAMS * blocks_per_request / num_blocks <= 1, "resize the load"

    recorder = InfoRecorder(service.address)
    recorder.start()
    stop_load = threading.Event()
    failures: list[str] = []
    wrong: list[list[int]] = []
    num_ok = [0]

    def stream(index: int) -> None:
        prompt = PROMPTS[index % len(PROMPTS)]
        with GenerationClient(service.address, timeout_s=WAIT_S) as client:
            while not stop_load.is_set():
                try:
                    result = collect(
                        client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
                    )
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                    continue
                if result.token_ids != expected[tuple(prompt)]:
                    wrong.append(prompt)
                num_ok[0] += 1

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(NUM_STREAMS)]
    try:
        for thread in threads:
            thread.start()
        wait_for(
            lambda: recorder.seen("prefill", 2, 2) and recorder.seen("decode", 2, 2),
            "both pools to grow to 2 ready replicas",
        )
    finally:
        stop_load.set()
        for thread in threads:
            thread.join(timeout=WAIT_S)
    assert not any(thread.is_alive() for thread in threads), "a stream hangs"

    try:
        wait_for(
            lambda: bool(recorder.samples)
            and recorder.samples[-1] == {"prefill": (1, 1, 1), "decode": (1, 1, 1)},
            "both pools to shrink back to 1",
        )
    finally:
        recorder.stop()
    assert failures == [] and wrong == [] and num_ok[0] >= NUM_STREAMS
    for sample in recorder.samples:
        for target, num_ready, num_replicas in sample.values():
            assert 1 <= target <= 2 and num_ready <= num_replicas <= 2, sample
    reports = assert_quiet(service)
    assert sorted(r.role for r in reports) == ["decode", "prefill"]
