"""Creating the prefill and decode replica actors on Ray and waiting until they are ready;
starting and killing single replicas of a running service (`RayReplicaFactory`)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any

import ray

from decode_worker.actor import DecodeActor
from decode_worker.colocated_actor import ColocatedActor
from pdserve.config import PdserveConfig, ResourcesConfig
from pdserve.errors import Unavailable
from pdserve.placement import NodeView, actor_options, alive_nodes, require_placeable
from pdserve.replica_setup import encode_config
from prefill_worker.actor import PrefillActor

logger = logging.getLogger(__name__)

# Async actors: many request streams interleave on one replica's event loop.
_MAX_CONCURRENCY = 1000
# How long the driver waits for replicas to release what would outlive their processes (a
# prefill replica's shared-memory KV pool) before it kills them anyway.
CLOSE_TIMEOUT_S = 5.0
# How much of that a scale-down waits on the router's event loop, which the wait blocks (a
# drained replica answers in milliseconds); a thread waits for the rest.
SCALE_DOWN_CLOSE_WAIT_S = 0.1


def create_pools(config: PdserveConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Starts `prefill.replicas` + `decode.replicas` actors with their configured resources.

    Returns {replica_id: actor handle} for each pool; does not wait for the models to load.
    Raises Unavailable at once if a pool can never be placed on the cluster's nodes."""
    require_placeable({"prefill": config.prefill, "decode": config.decode}, _nodes())
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


def create_colocated_pool(config: PdserveConfig) -> dict[str, Any]:
    """Starts `colocated.replicas` actors (`mode: colocated`), each prefilling and decoding.

    Returns {replica_id: actor handle}; does not wait for the models to load.
    Raises Unavailable at once if the pool can never be placed on the cluster's nodes."""
    require_placeable({"colocated": config.colocated}, _nodes())
    config_data = encode_config(config)
    pool = config.colocated
    restarts = config.reliability.max_replica_restarts
    return {
        f"colocated-{i}": _actor(ColocatedActor, pool.resources, restarts).remote(
            config_data, f"colocated-{i}"
        )
        for i in range(pool.replicas)
    }


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
    """Kills every actor of `pools` for good (an actor in several pools once), after
    `close_and_kill`'s bounded close. Blocks up to CLOSE_TIMEOUT_S."""
    unique = {actor: None for pool in pools for actor in pool.values()}
    close_and_kill(list(unique), CLOSE_TIMEOUT_S)


def close_and_kill(actors: list[Any], timeout_s: float) -> None:
    """Asks every replica actor to `close()` (all at once), waits until each answered or
    `timeout_s` passed, then kills them all for good. Blocks up to `timeout_s`.

    `ray.kill` ends a process at once, without its cleanup; the close runs that cleanup in the
    replica's own process, on whichever node it is. A replica that does not answer in time (it
    is stalled, or still loading) is killed all the same: its shared-memory files are then left
    to the sweep of dead owners the next sender on its node runs. Sweeping from here instead
    would not help: a replica's process may outlive `ray.kill` by a moment, and the driver sees
    only its own node's /dev/shm."""
    if actors:
        _kill_when_closed(actors, [actor.close.remote() for actor in actors], timeout_s)


def _kill_when_closed(actors: list[Any], closes: list[Any], timeout_s: float) -> None:
    done, _ = ray.wait(closes, num_returns=len(closes), timeout=timeout_s)
    for ref in done:
        # Retrieved, so that Ray logs nothing: a replica that died before has nothing to close.
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ref)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _kill_in_background(actor: Any, close: Any) -> None:
    try:
        _kill_when_closed([actor], [close], CLOSE_TIMEOUT_S)
    except ray.exceptions.RayError as exc:  # Ray shut down meanwhile: the actor went with it
        logger.warning("could not kill a retired replica: %s", _cause(exc))


class RayReplicaFactory:
    """Starts and kills single replicas of a running service, for live scaling.

    Called by `router.pool_scaler` on the router's event loop thread; `create` submits the
    actor and returns its handle without waiting for the model to load (Ray creates it in the
    background). A new replica gets the same actor options, resources and encoded config as
    the ones `create_pools` started (the same internal KV token included)."""

    _ACTOR_CLASSES: dict[str, type] = {
        "prefill": PrefillActor, "decode": DecodeActor, "colocated": ColocatedActor,
    }

    def __init__(self, config: PdserveConfig) -> None:
        self._config = config
        self._config_data = encode_config(config)

    def create(self, role: str, replica_id: str) -> Any:
        """Raises ValueError for a role with no actor class (a router bug, not user input)."""
        cls = self._ACTOR_CLASSES.get(role)
        if cls is None:
            raise ValueError(f"no replica actor for pool {role!r}")
        resources = getattr(self._config, role).resources
        restarts = self._config.reliability.max_replica_restarts
        return _actor(cls, resources, restarts).remote(self._config_data, replica_id)

    def kill(self, handle: Any) -> None:
        """Closes and kills one replica as `close_and_kill` does, blocking the calling event
        loop for at most SCALE_DOWN_CLOSE_WAIT_S: a replica that answers by then (the usual
        case) is killed before this returns; otherwise a thread waits up to CLOSE_TIMEOUT_S
        more and kills it (a stalled or still-loading replica)."""
        close = handle.close.remote()
        done, _ = ray.wait([close], timeout=SCALE_DOWN_CLOSE_WAIT_S)
        if done:
            _kill_when_closed([handle], [close], 0)
            return
        threading.Thread(
            target=_kill_in_background, args=(handle, close), name="replica-kill", daemon=True
        ).start()


def _actor(cls: type, resources: ResourcesConfig, max_restarts: int) -> Any:
    # Calls in flight when a replica dies fail (no task retries): the router decides what to
    # do with their requests; the restarted replica starts empty with a new epoch.
    return ray.remote(cls).options(
        **actor_options(resources),
        max_concurrency=_MAX_CONCURRENCY,
        max_restarts=max_restarts,
        max_task_retries=0,
    )


def _nodes() -> list[NodeView]:
    return alive_nodes(ray.nodes())


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or getattr(exc, "error_msg", None) or exc
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(exc).__name__
