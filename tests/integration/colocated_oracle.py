"""Load reports and the leak oracle of a service in `mode: colocated` (the shared
`conftest.load_reports` knows only the prefill and decode pools)."""

from __future__ import annotations

import time

import ray

from pdserve.messages import LoadReport, decode
from pdserve.serve import Service
from tests.integration.conftest import QUIET_TIMEOUT_S, router_task_stacks


def colocated_reports(service: Service) -> list[LoadReport]:
    """Load of every live colocated replica (killed ones are skipped)."""
    reports = []
    for actor in service.colocated_actors.values():
        try:
            reports.append(decode(LoadReport, ray.get(actor.load.remote(), timeout=30)))
        except ray.exceptions.RayActorError:
            continue
    return reports


def assert_colocated_quiet(service: Service) -> list[LoadReport]:
    """Once the system is quiet no colocated replica holds a request or a block and the router
    has nothing in flight. Polls (bounded) because aborts reach replicas asynchronously."""
    assert service.colocated_actors, "not a colocated service"
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        reports = colocated_reports(service)
        leaks = [
            r for r in reports
            if r.num_active_requests or r.num_waiting_requests
            or r.num_free_blocks != r.num_total_blocks
        ]
        router_busy = service.router is not None and service.router.front_door.num_inflight
        if reports and not leaks and not router_busy:
            return reports
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not quiet: leaks={leaks} router_inflight={router_busy}\n"
                f"{router_task_stacks(service)}"
            )
        time.sleep(0.05)  # polling interval of a bounded wait, not synchronisation


def totals(reports: list[LoadReport]) -> dict[str, int]:
    """Lifetime counters summed over the replicas."""
    return {
        "prefill_chunks": sum(r.total_prefill_chunks for r in reports),
        "mixed_steps": sum(r.total_mixed_steps for r in reports),
        "steps": sum(r.total_decode_steps for r in reports),
        "decode_tokens": sum(r.total_decode_tokens for r in reports),
        "requests": sum(r.total_requests for r in reports),
    }
