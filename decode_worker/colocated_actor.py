"""Ray actor shell of a colocated replica, `mode: colocated` (the shared part:
`pdserve.replica_actor`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.messages import ColocatedRequest, decode, encode
from pdserve.replica_actor import ReplicaActor, ReplicaParts

if TYPE_CHECKING:
    from decode_worker.colocated_worker import ColocatedWorker


class ColocatedActor(ReplicaActor["ColocatedWorker"]):
    """One colocated replica. See `decode_worker.colocated_worker` for the request life cycle."""

    ROLE = "colocated"

    def _make_worker(self, parts: ReplicaParts) -> ColocatedWorker:
        from decode_worker.colocated_worker import ColocatedWorker

        return ColocatedWorker(parts.config, parts.replica_id, parts.engine, parts.metrics)

    async def mark_reader(self, transfer_id: str, stalled: bool) -> bool:
        """See the worker's `mark_reader`."""
        return self._worker.mark_reader(transfer_id, stalled)

    async def generate(self, request_data: bytes) -> AsyncIterator[bytes]:
        """Streaming method: one `ColocatedEvent` per yield."""
        async for event in self._worker.generate(decode(ColocatedRequest, request_data)):
            yield encode(event)
