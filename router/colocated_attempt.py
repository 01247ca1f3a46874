"""One placement of a request on a colocated replica (`mode: colocated`).

A `ColocatedAttempt` is the colocated counterpart of `router.attempt.Attempt`, with the same
face, so `RequestFlow`'s retry, migration, stop-string and deadline handling apply unchanged:
`tokens()` yields `TokenEvent`s (the last with a finish reason), raises a PdserveError when the
attempt fails, `ReplicaLost` when its replica died or stalled and `Preempted` when the replica
preempted it (its blocks are gone; the flow re-prefills); `close()` always runs, cancels the
replica stream and, unless the attempt finished by itself, aborts the transfer id there, which
frees the request's blocks at once, then signals the router queue.

Placement: the least-loaded ready replica first (then the one with the most free blocks). A
replica that refuses (its only event is an error) holds nothing, and the next is tried. When
every replica refused and one had no room now (RESOURCE_EXHAUSTED), the attempt waits in the
router queue (`router.wait_queue`) and tries again when capacity frees; INVALID_ARGUMENT only
when every replica says the request can never fit (`router.refusals`). A replica that admits
the request answers with its first token, after prefilling it: the queue's head holds its turn
until then. No KV moves: the report says transport "none" and 0 bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Callable

from pdserve.config import PdserveConfig
from pdserve.errors import InvalidArgument, ResourceExhausted
from pdserve.messages import ColocatedEvent, ColocatedRequest, encode
from pdserve.metrics import RouterMetrics
from router.attempt import AttemptReport, TokenEvent
from router.preemption import Preempted
from router.ray_calls import EventStream
from router.reader_pace import ReaderPace
from router.refusals import Refusals
from router.replica_pool import DEAD, Replica, ReplicaPool
from router.stream_watch import next_event
from router.validation import ValidatedRequest
from router.wait_queue import COLOCATED_ROOM, QueueOrder, WaitQueue

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
        *,
        admitted_at: float,
        wait_queue: WaitQueue,
        reader: ReaderPace | None = None,
    ) -> None:
        """As `Attempt`'s."""
        self._config = config
        self._pool = pool
        self._eos_token_ids = eos_token_ids
        self._request = request
        self._previous = list(previous_tokens)
        self._request_id = request_id
        self._deadline = deadline
        self._admitted_at = admitted_at
        self._wait_queue = wait_queue
        self._reader = reader or ReaderPace()
        self._stop_telling: Callable[[], None] | None = None
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
        assert self._replica is not None, "placed"
        self._stop_telling = self._reader.tell(self._replica, self.transfer_id)
        self.report.timings.update(queue_s=event.queue_s, prefill_s=event.prefill_s)
        self.report.num_cached_tokens = event.num_cached_tokens
        while True:
            if event.finish_reason:
                self.report.timings["decode_s"] = event.decode_s
                self._finished = True
            if event.token_ids or event.finish_reason:
                yield TokenEvent(event.token_ids, event.finish_reason, event.logprobs)
            if event.finish_reason:
                return
            if event.preempted:
                assert self._replica is not None, "placed first"
                raise Preempted(self._replica.replica_id)
            event = await self._next()

    def close(self) -> None:
        """Cancels the stream; aborts the transfer on the replica unless it finished."""
        if self._stream is not None:
            self._stream.close()
        if self._stop_telling is not None:
            self._stop_telling()
        replica = self._replica
        if replica is not None and not self._finished and replica.state != DEAD:
            replica.handle.abort.remote(self.transfer_id)
        if replica is not None:
            self._wait_queue.notify()  # its blocks are released
        replica_id = replica.replica_id if replica is not None else ""
        # One replica did both halves.
        self.report.prefill_replica = self.report.decode_replica = replica_id

    async def _place(self) -> ColocatedEvent:
        """Opens the request on a replica that admits it, waiting in the router queue while
        none has room; returns its first event."""
        order = QueueOrder(self._request.priority, self._admitted_at)
        # The request holds an in-flight slot already: a full queue does not refuse it.
        event, self.report.queued_s = await self._wait_queue.take(
            self._try_place, order, self._deadline, COLOCATED_ROOM, bounded=False
        )
        return event

    async def _try_place(self) -> ColocatedEvent:
        """One round over the candidates; see `router.refusals` for what it raises when none
        admitted the request."""
        message = encode(self._colocated_request())
        refusals = Refusals("colocated")
        for replica in self._candidates():
            self._open(replica, message)
            try:
                return await self._next()
            except (ResourceExhausted, InvalidArgument) as exc:  # it holds nothing for us
                refusals.add(exc)
                replica.num_placed_since_report -= 1
                assert self._stream is not None, "opened above"
                self._stream.close()
                self._replica = self._stream = None
        num_new_tokens = self._request.sampling.max_tokens - len(self._previous)
        raise refusals.verdict(
            f"room for {self._request.num_prompt_tokens + len(self._previous)} prompt + "
            f"{num_new_tokens} new tokens"
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
            priority=self._request.priority, admitted_at=self._admitted_at,
        )
