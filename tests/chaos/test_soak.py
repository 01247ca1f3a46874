"""The random-fault soak (`make chaos`, `SOAK_SECONDS` long): clients send a mix of requests
against 2 prefill + 2 decode replicas while replicas are killed (Ray restarts them) or paused
with SIGSTOP beside a healthy peer. The mix: plain requests, long ones that outgrow the small
decode caches (preemption by recompute races with everything else), corrupted KV chunks, 50 ms
deadlines, cancels after the first token, prompts far over the context (refused by the cheap
bound before tokenizing), and slow readers that never read their stream (cancelled after
`timeouts.client_stall_s`). At the end: every request ended exactly once with an outcome its
kind allows, every completed output equals the reference, nothing leaked, and the service
still answers. Writes its figures (with router and replica RSS at start and end) to
bench-results/soak.json."""

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
import psutil
import pytest
import ray

from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.chaos.soak_kinds import KINDS, Kind, pick_kind
from tests.factories.config import make_config
from tests.factories.stalled_clients import StalledGrpcCall
from tests.integration.conftest import assert_quiet, load_reports
from tests.integration.test_replica_failures import reference
from tests.unit.test_metrics import value

pytestmark = [pytest.mark.chaos]
NUM_CLIENTS = 10
# Requests at most, per second of soak (a bound on the figures file, never reached on 2 cores).
MAX_REQUESTS_PER_S = 40
TARGET = 333  # prompts starting with it get a corrupted KV chunk
PROMPTS = [[5, 6, 7], [11, 12, 13, 14], [40, 41, 42, 43, 44, 45], list(range(60, 90))]
MAX_TOKENS = 12
# Long requests: 27 blocks of 16 tokens each at the end, while a decode cache holds 85, so a
# few at once on one replica preempt each other.
LONG_PROMPTS = [list(range(100, 130)), list(range(200, 225))]
LONG_MAX_TOKENS = 400
# Far over any context the tiny model's router accepts, and under the gRPC size limit.
HUGE_PROMPT = "a" * 1_000_000
CLIENT_STALL_S = 2.0
GENERATE = "/pdserve.v1.Generation/Generate"


class Soak:
    def __init__(
        self, service: Service, expected: dict[tuple[int, ...], list[int]], seconds: float
    ) -> None:
        self.service = service
        self.expected = expected
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.faults: collections.Counter[str] = collections.Counter()
        self.wrong_outputs: list[tuple[list[int], list[int]]] = []
        self.num_requests = 0
        self.num_preemptions = 0
        self.lock = threading.Lock()
        self.stop_at = time.monotonic() + seconds
        self.max_requests = int(seconds * MAX_REQUESTS_PER_S)

    def running(self) -> bool:
        with self.lock:
            return time.monotonic() < self.stop_at and self.num_requests < self.max_requests

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with GenerationClient(self.service.address) as client:
            while self.running():
                with self.lock:
                    self.num_requests += 1
                kind = pick_kind(rng)
                outcome = self.one_request(client, rng, kind)
                with self.lock:
                    self.outcomes[kind.name][outcome] += 1

    def one_request(self, client: GenerationClient, rng: random.Random, kind: Kind) -> str:
        if kind.name == "slow_reader":
            return self.slow_read(rng)
        prompt, max_tokens = rng.choice(PROMPTS), MAX_TOKENS
        if kind.name == "long":
            prompt, max_tokens = rng.choice(LONG_PROMPTS), LONG_MAX_TOKENS
        elif kind.name == "corrupt_kv":
            prompt = [TARGET, 1, 2]
        request = make_request(prompt, max_tokens=max_tokens, ignore_eos=True)
        if kind.name == "huge_prompt":
            request = pdserve_pb2.GenerateRequest(text=HUGE_PROMPT)
        timeout = 0.05 if kind.name == "short_deadline" else 60.0
        try:
            call = client._stub.Generate(request, timeout=timeout)
            if kind.name == "cancel":
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

    def slow_read(self, rng: random.Random) -> str:
        """A client that grants the server a 64-byte window for a long answer, never reads
        more, and hangs up after a while (gRPC cannot end such a call from the server side)."""
        request = make_request(rng.choice(LONG_PROMPTS), max_tokens=LONG_MAX_TOKENS)
        port = int(self.service.address.rsplit(":", 1)[1])
        with StalledGrpcCall(port, GENERATE, request.SerializeToString(), window=64):
            time.sleep(3 * CLIENT_STALL_S)  # how long the injected client stays stuck
        return "HUNG_UP"

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


def rss_mb(service: Service) -> dict[str, dict[str, float]]:
    """Memory of the router (this process) and of each live replica, in MB: resident (RSS,
    which counts the shared-memory KV pools a replica touched) and unique to it (USS)."""
    processes = {"router": psutil.Process()}
    for report in load_reports(service):
        try:
            processes[report.replica_id] = psutil.Process(report.pid)
        except psutil.NoSuchProcess:
            continue
    sizes = {}
    for name, process in sorted(processes.items()):
        try:
            memory = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        sizes[name] = {"rss": round(memory.rss / 1e6, 1), "uss": round(memory.uss / 1e6, 1)}
    return sizes


def test_random_fault_soak(ray_cluster: None, tiny_model_dir: Path, soak_seconds: float) -> None:
    config = make_config(
        str(tiny_model_dir),
        prefill={"replicas": 2},
        decode={"replicas": 2, "kv_cache": {"memory_mb": 1, "block_size": 16}},
        limits={"max_tokens": LONG_MAX_TOKENS},
        faults={"target_token_id": TARGET, "kv_chunk_fault": "corrupt"},
        timeouts={
            "load_poll_interval_s": 0.25, "load_poll_timeout_s": 2.0, "control_call_s": 2.0,
            "client_stall_s": CLIENT_STALL_S,
        },
        reliability={
            "max_replica_restarts": 1000, "max_migrations": 3, "prefill_retries": 3,
            "max_preemptions": 100,
        },
    )
    expected = {tuple(p): reference(tiny_model_dir, p, MAX_TOKENS) for p in PROMPTS}
    expected.update({tuple(p): reference(tiny_model_dir, p, LONG_MAX_TOKENS) for p in LONG_PROMPTS})
    with Service(config) as service:
        rss_at_start = rss_mb(service)
        soak = Soak(service, expected, soak_seconds)
        threads = [threading.Thread(target=soak.client_loop, args=(i,)) for i in range(NUM_CLIENTS)]
        threads.append(threading.Thread(target=soak.chaos_loop, args=(99,)))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=soak_seconds + 300)
        elapsed = time.monotonic() - started
        # Restarted replicas rejoin; then the system must be quiet and serve again.
        deadline = time.monotonic() + 180
        while len(load_reports(service)) < 4:
            assert time.monotonic() < deadline, "replicas did not come back"
            time.sleep(0.5)  # polling interval of a bounded wait
        reports = assert_quiet(service)
        rss_at_end = rss_mb(service)
        assert service.router is not None
        client_stalls = value(
            service.router.metrics.registry, "pdserve_router_client_stalls_total", api="grpc"
        )
        with GenerationClient(service.address, timeout_s=60) as client:
            final = collect(client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, ignore_eos=True))
    by_status: collections.Counter[str] = collections.Counter()
    for counts in soak.outcomes.values():
        by_status.update(counts)
    figures = {
        "seconds": round(elapsed, 1),
        "requests": soak.num_requests,
        "outcomes": dict(by_status),
        "outcomes_by_kind": {kind: dict(counts) for kind, counts in soak.outcomes.items()},
        "faults_injected": dict(soak.faults),
        "preemptions_of_completed_requests": soak.num_preemptions,
        # Slow readers the router cancelled (one whose replica failed first is not counted).
        "client_stalls_cancelled": client_stalls,
        "wrong_outputs": len(soak.wrong_outputs),
        "leaked_blocks": sum(r.num_total_blocks - r.num_free_blocks for r in reports),
        "leaked_leases": sum(r.num_leases for r in reports),
        "rss_mb_at_start": rss_at_start,
        "rss_mb_at_end": rss_at_end,
    }
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    assert sum(by_status.values()) == soak.num_requests  # each ended exactly once
    for kind, counts in soak.outcomes.items():
        assert set(counts) <= KINDS[kind].allowed, (kind, counts)
    assert not soak.wrong_outputs, soak.wrong_outputs[:3]
    assert final.token_ids == expected[tuple(PROMPTS[0])]
