"""Waiting, in the router's pod, until the Ray cluster has the nodes both pools need.

`pdserve serve` refuses to start when the alive nodes can never host a pool (see
`pdserve.placement`). On Kubernetes the worker pods may join the cluster after the router's
pod has: the router's command runs `python -m pdserve.k8s_manifest wait-for-pools CONFIG`
after `ray start` and before `pdserve serve`, so a fresh deployment waits for its workers
instead of crash-looping on a misleading "can never be placed".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pdserve.config import PdserveConfig
from pdserve.errors import Unavailable
from pdserve.k8s_manifest.plan import POOLS
from pdserve.placement import NodeView, alive_nodes, placement_problem


def pool_problems(config: PdserveConfig, nodes: list[NodeView]) -> list[str]:
    """Why each pool cannot start on `nodes` yet ([] = both can). Pure."""
    problems = []
    for name in POOLS:
        pool = getattr(config, name)
        problem = placement_problem(pool.resources, pool.replicas, nodes)
        if problem is not None:
            problems.append(f"{name}: {problem}")
    return problems


def wait_for_pools(
    config: PdserveConfig,
    list_nodes: Callable[[], list[NodeView]],
    timeout_s: float,
    poll_s: float = 2.0,
    report: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Blocks until `list_nodes()` can host both pools, reporting each new reason to wait.

    Raises Unavailable with the last reasons once `timeout_s` has passed."""
    deadline = clock() + timeout_s
    last: list[str] = []
    while True:
        problems = pool_problems(config, list_nodes())
        if not problems:
            return
        if clock() >= deadline:
            raise Unavailable(
                f"the Ray cluster still cannot host the pools after {timeout_s:.0f} s: "
                + "; ".join(problems)
            )
        if problems != last:
            report("pdserve: waiting for Ray nodes: " + "; ".join(problems))
            last = problems
        sleep(poll_s)


@contextmanager
def ray_nodes(config: PdserveConfig, ray_address: str | None) -> Iterator[Callable[[], list]]:
    """Joins the Ray cluster as a short-lived driver and yields a lister of its alive nodes."""
    import ray  # only this command needs Ray; the rest of the module stays Ray-free

    ray.init(
        address=ray_address or config.ray.address,
        namespace=config.ray.namespace,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        yield lambda: alive_nodes(ray.nodes())
    finally:
        ray.shutdown()
