"""The random-fault soak (`make chaos`): a bounded stream of requests against 2 prefill + 2
decode replicas while replicas are killed (Ray restarts them), paused with SIGSTOP, requests are
cancelled, time out, or carry injected KV corruption, and long requests outgrow the small decode
caches (preemption by recompute races with all of the above). At the end: every request ended
exactly once with an expected outcome, every completed output equals the reference, and nothing
leaked. Writes its figures to bench-results/soak.json."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import ray

from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, load_reports
from tests.integration.test_replica_failures import reference

SOAK_SECONDS = 300.0
MAX_REQUESTS = 10_000
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(SOAK_SECONDS + 600)]
NUM_CLIENTS = 10
TARGET = 333  # prompts starting with it get a corrupted KV chunk
PROMPTS = [[5, 6, 7], [11, 12, 13, 14], [40, 41, 42, 43, 44, 45], list(range(60, 90))]
MAX_TOKENS = 12
# Long requests: 27 blocks of 16 tokens each at the end, while a decode cache holds 85, so a
# few at once on one replica preempt each other.
LONG_PROMPTS = [list(range(100, 130)), list(range(200, 225))]
LONG_MAX_TOKENS = 400
# Outcomes a request may have under these faults; anything else (INTERNAL, UNKNOWN) fails.
ALLOWED = {
    "OK", "CANCELLED", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
}


class Soak:
    def __init__(self, service: Service, expected: dict[tuple[int, ...], list[int]]) -> None:
        self.service = service
        self.expected = expected
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.wrong_outputs: list[tuple[list[int], list[int]]] = []
        self.num_requests = 0
        self.num_preemptions = 0
        self.lock = threading.Lock()
        self.stop_at = time.monotonic() + SOAK_SECONDS

    def running(self) -> bool:
        with self.lock:
            return time.monotonic() < self.stop_at and self.num_requests < MAX_REQUESTS

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with GenerationClient(self.service.address) as client:
            while self.running():
                with self.lock:
                    self.num_requests += 1
                self.record(self.one_request(client, rng))

    def one_request(self, client: GenerationClient, rng: random.Random) -> str:
        roll = rng.random()
        prompt = [TARGET, 1, 2] if roll < 0.1 else rng.choice(PROMPTS)
        max_tokens = MAX_TOKENS
        if roll >= 0.4:
            prompt, max_tokens = rng.choice(LONG_PROMPTS), LONG_MAX_TOKENS
        request = make_request(prompt, max_tokens=max_tokens, ignore_eos=True)
        timeout = 0.05 if 0.1 <= roll < 0.15 else 60.0
        try:
            call = client._stub.Generate(request, timeout=timeout)
            if 0.15 <= roll < 0.25:
                next(call)
                call.cancel()
                list(call)
            tokens = []
            for response in call:
                tokens.extend(response.token_ids)
                if response.HasField("final"):
                    with self.lock:
                        self.num_preemptions += response.final.served_by.num_preemptions
        except grpc.RpcError as err:
            return err.code().name
        if tokens != self.expected[tuple(prompt)]:
            with self.lock:
                self.wrong_outputs.append((prompt, tokens))
        return "OK"

    def record(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    def chaos_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            time.sleep(rng.uniform(5, 15))  # the pace of injected faults, not synchronisation
            actors = {**self.service.prefill_actors, **self.service.decode_actors}
            replica_id = rng.choice(sorted(actors))
            if rng.random() < 0.5:
                ray.kill(actors[replica_id], no_restart=False)
                self.faults[f"kill {replica_id.split('-')[0]}"] += 1
            else:
                pids = {r.replica_id: r.pid for r in load_reports(self.service)}
                if replica_id in pids:
                    os.kill(pids[replica_id], signal.SIGSTOP)
                    time.sleep(rng.uniform(0.3, 3.0))  # the stall being injected
                    os.kill(pids[replica_id], signal.SIGCONT)
                    self.faults[f"stall {replica_id.split('-')[0]}"] += 1


def test_random_fault_soak(ray_cluster: None, tiny_model_dir: Path) -> None:
    config = make_config(
        str(tiny_model_dir),
        prefill={"replicas": 2},
        decode={"replicas": 2, "kv_cache": {"memory_mb": 1, "block_size": 16}},
        limits={"max_tokens": LONG_MAX_TOKENS},
        faults={"target_token_id": TARGET, "kv_chunk_fault": "corrupt"},
        timeouts={"load_poll_interval_s": 0.25, "load_poll_timeout_s": 2.0},
        reliability={
            "max_replica_restarts": 1000, "max_migrations": 3, "prefill_retries": 3,
            "max_preemptions": 100,
        },
    )
    expected = {tuple(p): reference(tiny_model_dir, p, MAX_TOKENS) for p in PROMPTS}
    expected.update(
        {tuple(p): reference(tiny_model_dir, p, LONG_MAX_TOKENS) for p in LONG_PROMPTS}
    )
    with Service(config) as service:
        soak = Soak(service, expected)
        threads = [threading.Thread(target=soak.client_loop, args=(i,)) for i in range(NUM_CLIENTS)]
        threads.append(threading.Thread(target=soak.chaos_loop, args=(99,)))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=SOAK_SECONDS + 300)
        elapsed = time.monotonic() - started
        # Restarted replicas rejoin; then the system must be quiet and serve again.
        deadline = time.monotonic() + 180
        while len(load_reports(service)) < 4:
            assert time.monotonic() < deadline, "replicas did not come back"
            time.sleep(0.5)  # polling interval of a bounded wait
        reports = assert_quiet(service)
        with GenerationClient(service.address, timeout_s=60) as client:
            final = collect(client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, ignore_eos=True))
    figures = {
        "seconds": round(elapsed, 1),
        "requests": soak.num_requests,
        "outcomes": dict(soak.outcomes),
        "faults_injected": dict(soak.faults),
        "preemptions_of_completed_requests": soak.num_preemptions,
        "wrong_outputs": len(soak.wrong_outputs),
        "leaked_blocks": sum(r.num_total_blocks - r.num_free_blocks for r in reports),
        "leaked_leases": sum(r.num_leases for r in reports),
    }
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    assert sum(soak.outcomes.values()) == soak.num_requests  # each ended exactly once
    assert set(soak.outcomes) <= ALLOWED, soak.outcomes
    assert not soak.wrong_outputs, soak.wrong_outputs[:3]
    assert final.token_ids == expected[tuple(PROMPTS[0])]
