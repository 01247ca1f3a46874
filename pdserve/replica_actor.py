"""What every replica actor shell shares: its identity, its engine and its worker.

A shell (`prefill_worker.actor`, `decode_worker.actor`, `decode_worker.colocated_actor`)
subclasses `ReplicaActor`, names its `ROLE` and builds its worker from the `ReplicaParts` in
`_make_worker`; it adds only the methods of its own role. Methods take and return msgpack
`bytes` (see `pdserve.messages`); `abort` returns a bool and `close` nothing. No torch is
imported here or by the shells: the engine and the workers are imported inside the
constructor, in the actor's own process, so the driver can create actors without loading torch.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import ray

from pdserve.config import PdserveConfig
from pdserve.cpu_pinning import CpuClaim, pin_process
from pdserve.messages import LoadReport, encode
from pdserve.metrics import ReplicaMetrics
from pdserve.replica_setup import decode_config, setup_replica_logging

if TYPE_CHECKING:
    from engine.replica_engine import ReplicaEngine


class ReplicaWorker(Protocol):
    """What the shared actor methods call on a role's worker (on the actor's event loop)."""

    def load(self, node_id: str, pid: int, epoch: str = "") -> LoadReport: ...

    def abort(self, transfer_id: str) -> bool: ...


W = TypeVar("W", bound=ReplicaWorker)


@dataclass(frozen=True)
class ReplicaParts:
    """What the shared constructor built, for the role's worker."""

    config: PdserveConfig
    replica_id: str
    engine: ReplicaEngine
    metrics: ReplicaMetrics


class ReplicaActor(Generic[W]):
    """One replica of the `ROLE` pool.

    The constructor (run by Ray in the actor's process) reads the config, sets up logging,
    loads the model and the KV cache of the `ROLE` pool, starts the replica's metrics and
    builds the worker; it raises whatever fails (Ray reports the actor as failed to start).
    The epoch, minted per process, tells the router a restarted replica from the one it placed
    requests on."""

    # The pool this actor serves: its config section and its metrics `role` label.
    ROLE: ClassVar[str]

    def __init__(self, config_data: bytes, replica_id: str) -> None:
        from engine.replica_engine import build_replica_engine

        config = decode_config(config_data)
        setup_replica_logging(config, replica_id)
        pool = getattr(config, self.ROLE)
        # Before the engine, so torch's threads start inside the affinity; the claim's open
        # descriptors hold the cores until the process exits.
        self._cpu_claim = CpuClaim()
        if pool.resources.pin_cpus:
            self._cpu_claim = pin_process(pool.resources.torch_threads, replica_id)
        engine = build_replica_engine(config.model, pool.kv_cache, pool.resources.torch_threads)
        self._engine = engine
        metrics = ReplicaMetrics.start(
            config.metrics, replica_id, self.ROLE, ray.util.get_node_ip_address()
        )
        metrics.set_pinned_cpus(len(self._cpu_claim.cpu_ids))
        metrics.set_native_kernels(engine.loaded.kernels.startswith("native"))
        self._worker = self._make_worker(ReplicaParts(config, replica_id, engine, metrics))
        self._node_id = ray.get_runtime_context().get_node_id()
        self._epoch = uuid.uuid4().hex[:12]

    def _make_worker(self, parts: ReplicaParts) -> W:
        """The role's worker; called once by the constructor."""
        raise NotImplementedError

    async def model_info(self) -> bytes:
        return encode(self._engine.model_info())

    async def load(self) -> bytes:
        report = self._worker.load(self._node_id, os.getpid(), self._epoch)
        return encode(dataclasses.replace(report, kernels=self._engine.loaded.kernels))

    async def abort(self, transfer_id: str) -> bool:
        return self._worker.abort(transfer_id)

    async def close(self) -> None:
        """Releases what would outlive the process when it is killed (a prefill replica's
        shared-memory KV pool). Called by the driver right before it kills the actor (see
        `pdserve.pools.close_and_kill`). Default: nothing to release."""
