"""Killed prefill replicas leave no shared-memory KV pool behind: neither the one a scale-down
retires nor those `Service.stop()` kills (`ray.kill` skips a process's own cleanup, so the
service asks each replica to close first)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import load_reports
from tests.integration.test_live_scaling import WAIT_S, wait_for

SHM_DIR = Path("/dev/shm")
PROMPTS = [[5, 17, 42, 99, 7, 3], [11, 12, 13], [200, 150, 30], [64, 65]]


def pool_files(pid: int) -> list[Path]:
    return sorted(SHM_DIR.glob(f"pdkvpool-{pid}-*"))


def serve_until_every_prefill_replica_has_a_pool(service: Service) -> dict[str, int]:
    """{prefill replica id: pid}, once each replica made its pool (on its first shm send)."""
    pids = {r.replica_id: r.pid for r in load_reports(service) if r.role == "prefill"}
    with GenerationClient(service.address, timeout_s=WAIT_S) as client:

        def serve_a_round() -> bool:
            with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
                results = list(pool.map(
                    lambda p: collect(client.generate(p, max_tokens=4)), PROMPTS
                ))
            assert {r.final.served_by.kv_transport for r in results} == {"shm"}
            return all(pool_files(pid) for pid in pids.values())

        wait_for(serve_a_round, "a shm transfer from every prefill replica")
    return pids


def test_killed_prefill_replicas_leave_no_shm_pool(
    ray_cluster: None, tiny_model_dir: Path
) -> None:
    config = make_config(
        str(tiny_model_dir), prefill={"replicas": 2},
        kv_transfer={"transport": "shm", "shm_pool_mb": 4},
    )
    service = Service(config)
    service.start()
    try:
        pids = serve_until_every_prefill_replica_has_a_pool(service)
        with GenerationClient(service.address, timeout_s=WAIT_S) as client:
            client.scale({"prefill": 1})
            wait_for(lambda: len(client.info().prefill.replicas) == 1, "the scale-down")
            (kept,) = [r.replica_id for r in client.info().prefill.replicas]
        (retired,) = set(pids) - {kept}
        # Usually gone already; a replica slow to answer its close is killed from a thread.
        wait_for(lambda: pool_files(pids[retired]) == [], f"{retired} to remove its pool")
        assert pool_files(pids[kept]), "the replica still serving keeps its pool"
    finally:
        service.stop()
    assert pool_files(pids[kept]) == [], f"{kept} left its pool after stop()"
