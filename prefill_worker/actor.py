"""Ray actor shell of a prefill replica.

Every method takes and returns msgpack `bytes` (see `pdserve.messages`). This module imports
no torch: the engine is imported inside the constructor, in the actor's own process, so the
driver can create actors without loading torch.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import ray

from pdserve.messages import PrefillRequest, decode, encode
from pdserve.metrics import ReplicaMetrics
from pdserve.replica_setup import decode_config, setup_replica_logging


class PrefillActor:
    """One prefill replica. See `prefill_worker.worker` for the request life cycle."""

    def __init__(self, config_data: bytes, replica_id: str) -> None:
        from engine.replica_engine import build_replica_engine
        from prefill_worker.worker import PrefillWorker

        config = decode_config(config_data)
        setup_replica_logging(config, replica_id)
        pool = config.prefill
        engine = build_replica_engine(config.model, pool.kv_cache, pool.resources.torch_threads)
        self._engine = engine
        metrics = ReplicaMetrics.start(
            config.metrics, replica_id, "prefill", ray.util.get_node_ip_address()
        )
        self._worker = PrefillWorker(config, replica_id, engine, metrics)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._epoch = uuid.uuid4().hex[:12]

    async def model_info(self) -> bytes:
        return encode(self._engine.model_info())

    async def load(self) -> bytes:
        return encode(self._worker.load(self._node_id, os.getpid(), self._epoch))

    async def prefill(self, request_data: bytes) -> AsyncIterator[bytes]:
        """Streaming method: one `PrefillEvent` per yield."""
        request = decode(PrefillRequest, request_data)
        async for event in self._worker.prefill(request):
            yield encode(event)

    async def abort(self, transfer_id: str) -> bool:
        return self._worker.abort(transfer_id)
