"""Decode blocks for one attempt: reserved on a decode replica before prefill starts.

A `DecodeReservation` asks the ready decode replicas, most free blocks first, to reserve blocks
for prompt + tokens already sent (plus the replica's growth margin). When every one that
answered has no room now, it waits in the router queue (`router.wait_queue`, ordered by the
request's priority and admission time) and tries again when capacity frees; INVALID_ARGUMENT
only when every replica says the request can never fit (`router.refusals`).

A replica that dies, or gives no answer within `timeouts.control_call_s` and its share of the
time left (`stream_watch.control_call_timeout`), is lost for this attempt: the round goes on
with the next replica, and a silent one is marked suspect in its pool at once (no placement
waits on it until it answers a poll). When no other replica took the request, the round ends
with `ReplicaLost` (the flow retries elsewhere) unless one merely lacked room. Replicas that
never answered are remembered (`unanswered`): the call may still land, so the attempt aborts
its transfer id there whatever the outcome.
"""

from __future__ import annotations

from pdserve.config import PdserveConfig
from pdserve.errors import DeadlineExceeded, PdserveError, Unavailable, error_from_info
from pdserve.messages import ReserveReply, ReserveRequest, encode
from router.ray_calls import call_message
from router.refusals import Refusals
from router.replica_pool import Replica, ReplicaPool
from router.stream_watch import ReplicaLost, control_call_timeout, seconds_left
from router.validation import ValidatedRequest
from router.wait_queue import DECODE_BLOCKS, QueueOrder, WaitQueue


class DecodeReservation:
    """The decode side of one attempt's placement; owned by that attempt (event loop only)."""

    def __init__(
        self,
        config: PdserveConfig,
        pool: ReplicaPool,
        request: ValidatedRequest,
        num_previous_tokens: int,
        ids: tuple[str, str],
        deadline: float,
        order: QueueOrder,
        wait_queue: WaitQueue,
    ) -> None:
        """`ids` are the request id and the attempt's transfer id."""
        self._config = config
        self._pool = pool
        self._request = request
        self._num_previous = num_previous_tokens
        self._request_id, self._transfer_id = ids
        self._deadline = deadline
        self._order = order
        self._wait_queue = wait_queue
        # Replicas asked to reserve that never answered (timeout, cancel): they may hold
        # blocks under the transfer id.
        self._unanswered: dict[str, Replica] = {}

    @property
    def unanswered(self) -> list[Replica]:
        return list(self._unanswered.values())

    async def reserve(self) -> tuple[Replica, float]:
        """The replica that reserved, and the seconds spent in the router queue first."""
        # The request holds an in-flight slot already: a full queue does not refuse it.
        return await self._wait_queue.take(
            self._try_reserve, self._order, self._deadline, DECODE_BLOCKS, bounded=False
        )

    async def _try_reserve(self) -> Replica:
        """One round over the ready decode replicas, most free blocks first; see
        `router.refusals` for what it raises when none reserved. A replica that dies or gives
        no answer within its share of the time left (`stream_watch.control_call_timeout`)
        counts as lost: the round goes on with the next one, and the round's verdict is
        `ReplicaLost` (the flow retries elsewhere) unless another replica only lacked room."""
        message = encode(self._reserve_request())
        refusals = Refusals("decode")
        candidates = self._pool.by_most_free_blocks()
        for index, replica in enumerate(candidates):
            self._unanswered[replica.replica_id] = replica
            timeout_s = control_call_timeout(
                self._deadline, len(candidates) - index, self._config.timeouts.control_call_s
            )
            try:
                reply = await call_message(
                    replica.handle.reserve, ReserveReply, message, timeout_s=timeout_s,
                    what=f"{replica.replica_id}.reserve",
                )
            except (Unavailable, DeadlineExceeded) as exc:
                refusals.add(self._lost(replica, exc, timeout_s))
                continue
            del self._unanswered[replica.replica_id]
            if reply.ok:
                replica.num_placed_since_report += 1
                return replica
            assert reply.error is not None, "a refused reservation carries its error"
            refusals.add(error_from_info(reply.error))
        num_new_tokens = self._request.sampling.max_tokens - self._num_previous
        raise refusals.verdict(
            f"room for {self._request.num_prompt_tokens + self._num_previous} prompt + "
            f"{num_new_tokens} new tokens"
        )

    def _lost(self, replica: Replica, error: PdserveError, timeout_s: float) -> ReplicaLost:
        """`replica` died or did not answer a reservation in `timeout_s`: lost for this
        attempt; a silent one is also suspect for every placement until it answers a poll.
        Re-raises DeadlineExceeded when it is the request's own deadline that passed."""
        if isinstance(error, Unavailable):
            return ReplicaLost(replica, f"failed: {error.message}")
        seconds_left(self._deadline)
        self._pool.mark_suspect(
            replica, f"request {self._request_id}: no answer to reserve in {timeout_s:.1f} s"
        )
        return ReplicaLost(replica, f"did not answer reserve in {timeout_s:.1f} s")

    def _reserve_request(self) -> ReserveRequest:
        return ReserveRequest(
            request_id=self._request_id, transfer_id=self._transfer_id,
            num_prompt_tokens=self._request.num_prompt_tokens + self._num_previous,
            max_tokens=self._request.sampling.max_tokens - self._num_previous,
            deadline=self._deadline, priority=self._order.priority,
            admitted_at=self._order.admitted_at,
        )
