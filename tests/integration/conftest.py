"""One local Ray cluster per test session; services built from factories; the leak oracle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray

from pdserve.messages import LoadReport, decode
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.factories.model import build_tiny_model_dir

QUIET_TIMEOUT_S = 30.0
WAIT_FOR_TIMEOUT_S = 150.0  # scaling scenarios load models on 2 shared cores


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    # More logical CPUs than cores: several small replicas share the 2 real ones.
    ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING,
             namespace="pdserve-tests")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    """1 prefill + 2 decode replicas of the tiny Llama: placement and hand-off to either."""
    config = make_config(str(tiny_model_dir), decode={"replicas": 2})
    with Service(config) as running:
        yield running


def load_reports(service: Service) -> list[LoadReport]:
    """Load of every live replica (killed ones are skipped)."""
    reports = []
    actors = {**service.prefill_actors, **service.decode_actors, **service.colocated_actors}
    for actor in actors.values():
        try:
            reports.append(decode(LoadReport, ray.get(actor.load.remote(), timeout=30)))
        except ray.exceptions.RayActorError:
            continue
    return reports


def assert_quiet(service: Service) -> list[LoadReport]:
    """The leak oracle: once the system is quiet, no lease, block, transfer or router entry is
    left. Polls (bounded) because aborts reach replicas asynchronously."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while True:
        reports = load_reports(service)
        leaks = [
            r for r in reports
            if r.num_active_requests or r.num_leases or r.num_transfers
            or r.num_free_blocks != r.num_total_blocks
        ]
        router_busy = service.router is not None and service.router.front_door.num_inflight
        if not leaks and not router_busy:
            return reports
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not quiet: leaks={leaks} router_inflight={router_busy}\n"
                f"{router_task_stacks(service)}"
            )
        time.sleep(0.05)  # polling interval of a bounded wait, not synchronisation


def router_task_stacks(service: Service) -> str:
    """Where each task on the router's event loop is suspended (file:line function, outermost
    first, following what each coroutine awaits; the chain stops at an async generator's
    step, which does not name its generator): what a test reports when it finds a request
    still in flight."""
    loop = service.router_loop
    if loop is None:
        return "(the router is stopped)"

    async def collect() -> str:
        lines = []
        for task in asyncio.all_tasks():
            if task is asyncio.current_task():
                continue
            lines.append(f"task {task.get_name()}: " + " -> ".join(_await_chain(task)))
        return "\n".join(sorted(lines))

    return asyncio.run_coroutine_threadsafe(collect(), loop).result(timeout=10)


def _await_chain(task: asyncio.Task[object]) -> list[str]:
    parts: list[str] = []
    awaited: object = task.get_coro()
    while awaited is not None and len(parts) < 40:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            parts.append(type(awaited).__name__)
            break
        parts.append(
            f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        )
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return parts


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = WAIT_FOR_TIMEOUT_S
) -> None:
    """Polls `condition` until it holds; raises AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)  # polling interval of a bounded wait
