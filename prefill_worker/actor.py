"""Ray actor shell of a prefill replica (the shared part: `pdserve.replica_actor`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.messages import PrefillRequest, decode, encode
from pdserve.replica_actor import ReplicaActor, ReplicaParts

if TYPE_CHECKING:
    from prefill_worker.worker import PrefillWorker


class PrefillActor(ReplicaActor["PrefillWorker"]):
    """One prefill replica. See `prefill_worker.worker` for the request life cycle."""

    ROLE = "prefill"

    def _make_worker(self, parts: ReplicaParts) -> PrefillWorker:
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker(parts.config, parts.replica_id, parts.engine, parts.metrics)

    async def prefill(self, request_data: bytes) -> AsyncIterator[bytes]:
        """Streaming method: one `PrefillEvent` per yield."""
        request = decode(PrefillRequest, request_data)
        async for event in self._worker.prefill(request):
            yield encode(event)

    async def close(self) -> None:
        """Stops the worker and closes its KV senders: the shm sender unlinks its pool segment
        (`/dev/shm/pdkvpool-*`), which a killed process would leave behind."""
        self._worker.close()
