"""Creating the prefill and decode replica actors on Ray and waiting until they are ready."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import ray

from decode_worker.actor import DecodeActor
from pdserve.config import PdserveConfig, ResourcesConfig
from pdserve.errors import Unavailable
from pdserve.replica_setup import encode_config
from prefill_worker.actor import PrefillActor

logger = logging.getLogger(__name__)

# Async actors: many request streams interleave on one replica's event loop.
_MAX_CONCURRENCY = 1000


def create_pools(config: PdserveConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Starts `prefill.replicas` + `decode.replicas` actors with their configured resources.

    Returns {replica_id: actor handle} for each pool; does not wait for the models to load."""
    config_data = encode_config(config)
    restarts = config.reliability.max_replica_restarts
    prefill = {
        f"prefill-{i}": _actor(PrefillActor, config.prefill.resources, restarts).remote(
            config_data, f"prefill-{i}"
        )
        for i in range(config.prefill.replicas)
    }
    decode = {
        f"decode-{i}": _actor(DecodeActor, config.decode.resources, restarts).remote(
            config_data, f"decode-{i}"
        )
        for i in range(config.decode.replicas)
    }
    return prefill, decode


def wait_until_ready(actors: dict[str, Any], timeout_s: float) -> None:
    """Blocks until every actor finished loading, printing progress to stderr.

    Raises Unavailable naming the replica when one fails to start or the timeout passes."""
    pending = {actor.load.remote(): replica_id for replica_id, actor in actors.items()}
    started = time.monotonic()
    while pending:
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            waiting = sorted(pending.values())
            raise Unavailable(f"replicas not ready after {timeout_s:.0f} s: {waiting}")
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=2.0)
        for ref in done:
            replica_id = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise Unavailable(f"{replica_id} failed to start: {_cause(exc)}") from None
        print(
            f"\rpdserve: {len(actors) - len(pending)}/{len(actors)} replicas ready "
            f"({time.monotonic() - started:.0f} s)",
            end="" if pending else "\n", file=sys.stderr, flush=True,
        )


def kill_pools(*pools: dict[str, Any]) -> None:
    for pool in pools:
        for actor in pool.values():
            ray.kill(actor, no_restart=True)


def _actor(cls: type, resources: ResourcesConfig, max_restarts: int) -> Any:
    # Calls in flight when a replica dies fail (no task retries): the router decides what to
    # do with their requests; the restarted replica starts empty with a new epoch.
    return ray.remote(cls).options(
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        max_concurrency=_MAX_CONCURRENCY,
        max_restarts=max_restarts,
        max_task_retries=0,
    )


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or getattr(exc, "error_msg", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(exc).__name__
