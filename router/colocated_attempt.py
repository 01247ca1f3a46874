"""One placement of a request on a colocated replica (`mode: colocated`).

A `ColocatedAttempt` is the colocated counterpart of `router.attempt.Attempt`, with the same
face, so `RequestFlow`'s retry, migration, stop-string and deadline handling apply unchanged:
`tokens()` yields `TokenEvent`s (the last with a finish reason), raises a PdserveError when the
attempt fails and `ReplicaLost` when its replica died or stalled; `close()` always runs, cancels
the replica stream and, unless the attempt finished by itself, aborts the transfer id there,
which frees the request's blocks at once.

Placement: the least-loaded ready replica first (then the one with the most free blocks); one
that answers RESOURCE_EXHAUSTED (its KV cache cannot hold prompt + max_tokens) holds nothing,
and the next is tried. No KV moves: the report says transport "none" and 0 bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

from pdserve.config import PdserveConfig
from pdserve.errors import ResourceExhausted
from pdserve.messages import ColocatedEvent, ColocatedRequest, encode
from pdserve.metrics import RouterMetrics
from router.attempt import AttemptReport, TokenEvent
from router.ray_calls import EventStream
from router.replica_pool import DEAD, Replica, ReplicaPool
from router.stream_watch import next_event
from router.validation import ValidatedRequest

# What the final message reports as the KV transport of a colocated request: none moved.
NO_KV_TRANSPORT = "none"


class ColocatedAttempt:
    def __init__(
        self,
        config: PdserveConfig,
        pool: ReplicaPool,
        eos_token_ids: list[int],
        request: ValidatedRequest,
        previous_tokens: list[int],
        request_id: str,
        deadline: float,
        metrics: RouterMetrics,
    ) -> None:
        self._config = config
        self._pool = pool
        self._eos_token_ids = eos_token_ids
        self._request = request
        self._previous = list(previous_tokens)
        self._request_id = request_id
        self._deadline = deadline
        del metrics  # same face as Attempt; no KV transfer to count here
        # Minted here, per attempt: a retried or migrated request never reuses replica state.
        self.transfer_id = uuid.uuid4().hex
        self.report = AttemptReport(kv_transport=NO_KV_TRANSPORT)
        self._replica: Replica | None = None
        self._placed_epoch = ""
        self._stream: EventStream | None = None
        self._finished = False

    async def tokens(self) -> AsyncGenerator[TokenEvent, None]:
        """Yields new tokens (the first one included); the last event carries a finish
        reason."""
        event = await self._place()
        self.report.timings.update(queue_s=event.queue_s, prefill_s=event.prefill_s)
        self.report.num_cached_tokens = event.num_cached_tokens
        while True:
            if event.finish_reason:
                self.report.timings["decode_s"] = event.decode_s
                self._finished = True
            yield TokenEvent(event.token_ids, event.finish_reason, event.logprobs)
            if event.finish_reason:
                return
            event = await self._next()

    def close(self) -> None:
        """Cancels the stream; aborts the transfer on the replica unless it finished."""
        if self._stream is not None:
            self._stream.close()
        replica = self._replica
        if replica is not None and not self._finished and replica.state != DEAD:
            replica.handle.abort.remote(self.transfer_id)
        replica_id = replica.replica_id if replica is not None else ""
        # One replica did both halves.
        self.report.prefill_replica = self.report.decode_replica = replica_id

    async def _place(self) -> ColocatedEvent:
        """Opens the request on the first replica that admits it; returns its first event."""
        message = encode(self._colocated_request())
        refused: ResourceExhausted | None = None
        for replica in self._candidates():
            self._open(replica, message)
            try:
                return await self._next()
            except ResourceExhausted as exc:  # it holds nothing for us: try the next one
                refused = exc
                replica.num_placed_since_report -= 1
                assert self._stream is not None, "opened above"
                self._stream.close()
                self._replica = self._stream = None
        assert refused is not None, "candidates() raises when there is no replica"
        raise ResourceExhausted(
            f"no colocated replica has room for {self._request.num_prompt_tokens} prompt + "
            f"{self._request.sampling.max_tokens} new tokens ({refused.message})"
        )

    def _candidates(self) -> list[Replica]:
        """Ready replicas, fewest pending requests first, then most free blocks. Raises
        UNAVAILABLE if none."""
        ready = self._pool.by_least_loaded()
        return sorted(
            ready, key=lambda r: (r.pending_requests(), -(r.load.num_free_blocks if r.load else 0))
        )

    def _open(self, replica: Replica, message: bytes) -> None:
        self._replica = replica
        self._placed_epoch = replica.epoch
        replica.num_placed_since_report += 1
        self._stream = EventStream(
            replica.handle.generate, ColocatedEvent, message, f"{replica.replica_id}.generate"
        )

    async def _next(self) -> ColocatedEvent:
        """The stream's next event; raises its error, or ReplicaLost when the replica died,
        restarted or stopped answering the router's polls while the stream waited."""
        replica, stream = self._replica, self._stream
        assert replica is not None and stream is not None, "placed first"
        event: ColocatedEvent = await next_event(
            stream, replica, self._placed_epoch, self._deadline,
            self._config.timeouts.load_poll_interval_s,
        )
        return event

    def _colocated_request(self) -> ColocatedRequest:
        return ColocatedRequest(
            request_id=self._request_id, transfer_id=self.transfer_id,
            prompt_token_ids=self._request.prompt_token_ids + self._previous,
            sampling=self._request.sampling, eos_token_ids=self._eos_token_ids,
            deadline=self._deadline, num_previous_tokens=len(self._previous),
        )
