"""Ray actor shell of a decode replica.

Every method takes and returns msgpack `bytes` (see `pdserve.messages`). This module imports
no torch: the engine is imported inside the constructor, in the actor's own process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import ray

from pdserve.messages import DecodeRequest, ReserveRequest, decode, encode
from pdserve.metrics import ReplicaMetrics
from pdserve.replica_setup import decode_config, setup_replica_logging


class DecodeActor:
    """One decode replica. See `decode_worker.worker` for the request life cycle."""

    def __init__(self, config_data: bytes, replica_id: str) -> None:
        from decode_worker.worker import DecodeWorker
        from engine.replica_engine import build_replica_engine
        from kvtransfer import KVLayout, make_receiver

        config = decode_config(config_data)
        setup_replica_logging(config, replica_id)
        pool = config.decode
        engine = build_replica_engine(config.model, pool.kv_cache, pool.resources.torch_threads)
        kv_config = config.kv_transfer
        if kv_config.host == "auto":
            kv_config = kv_config.model_copy(update={"host": ray.util.get_node_ip_address()})
        layout = KVLayout(**engine.kv_layout_fields())  # type: ignore[arg-type]
        receiver = make_receiver(kv_config.transport, layout, kv_config)
        receiver.start()
        self._engine = engine
        metrics = ReplicaMetrics.start(
            config.metrics, replica_id, "decode", ray.util.get_node_ip_address()
        )
        self._worker = DecodeWorker(config, replica_id, engine, receiver, metrics)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._epoch = uuid.uuid4().hex[:12]

    async def model_info(self) -> bytes:
        return encode(self._engine.model_info())

    async def load(self) -> bytes:
        return encode(self._worker.load(self._node_id, os.getpid(), self._epoch))

    async def reserve(self, request_data: bytes) -> bytes:
        return encode(self._worker.reserve(decode(ReserveRequest, request_data)))

    async def generate(self, request_data: bytes) -> AsyncIterator[bytes]:
        """Streaming method: one `DecodeEvent` per yield."""
        async for event in self._worker.generate(decode(DecodeRequest, request_data)):
            yield encode(event)

    async def abort(self, transfer_id: str) -> bool:
        return self._worker.abort(transfer_id)
