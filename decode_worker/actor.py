"""Ray actor shell of a decode replica (the shared part: `pdserve.replica_actor`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import ray

from pdserve.messages import DecodeRequest, ReserveRequest, decode, encode
from pdserve.replica_actor import ReplicaActor, ReplicaParts

if TYPE_CHECKING:
    from decode_worker.worker import DecodeWorker


class DecodeActor(ReplicaActor["DecodeWorker"]):
    """One decode replica. See `decode_worker.worker` for the request life cycle."""

    ROLE = "decode"

    def _make_worker(self, parts: ReplicaParts) -> DecodeWorker:
        from decode_worker.worker import DecodeWorker
        from kvtransfer import KVLayout, make_receiver

        kv_config = parts.config.kv_transfer
        if kv_config.host == "auto":
            kv_config = kv_config.model_copy(update={"host": ray.util.get_node_ip_address()})
        layout = KVLayout(**parts.engine.kv_layout_fields())  # type: ignore[arg-type]
        receiver = make_receiver(kv_config.transport, layout, kv_config)
        receiver.start()
        return DecodeWorker(
            parts.config, parts.replica_id, parts.engine, receiver, parts.metrics
        )

    async def reserve(self, request_data: bytes) -> bytes:
        return encode(self._worker.reserve(decode(ReserveRequest, request_data)))

    async def mark_reader(self, transfer_id: str, stalled: bool) -> bool:
        """See the worker's `mark_reader`."""
        return self._worker.mark_reader(transfer_id, stalled)

    async def generate(self, request_data: bytes) -> AsyncIterator[bytes]:
        """Streaming method: one `DecodeEvent` per yield."""
        async for event in self._worker.generate(decode(DecodeRequest, request_data)):
            yield encode(event)
