"""One placement of a request: reserve decode blocks, prefill, hand off, decode.

Life of an attempt:
1. **Reserve** decode blocks for prompt + tokens already sent (`router.decode_reservation`:
   waits in the router queue while no decode replica has room; skips a silent replica).
2. **Prefill** on the least-loaded prefill replica whose queue takes the request (while every
   prefill queue is full, wait in the router queue, holding the reservation); its first token
   is yielded at once.
3. **Hand off + decode.** The KV moves to the reserved blocks; decode streams the rest.

`tokens()` yields the request's new tokens as they come. It raises a PdserveError when the
attempt fails; `ReplicaLost` when a replica it used died or stalled (the flow may then retry or
migrate); `Preempted` when the decode replica preempted it (its blocks are gone; the flow
re-prefills). `close()` always runs: it cancels the replica streams and, unless the attempt
finished by itself, aborts the transfer id on the replicas that may hold something for it
(always on a decode replica whose reservation went unanswered), which frees the prefill lease
and the decode blocks at once; then it signals the router queue (decode blocks were released).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.config import PdserveConfig
from pdserve.errors import (
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
)
from pdserve.messages import (
    DecodeEvent,
    DecodeRequest,
    KVTarget,
    PrefillEvent,
    PrefillRequest,
    TokenLogprobs,
    encode,
)
from pdserve.metrics import RouterMetrics
from router.decode_reservation import DecodeReservation
from router.kv_transport_choice import kv_transport_for
from router.preemption import Preempted
from router.ray_calls import EventStream
from router.reader_pace import ReaderPace
from router.refusals import Refusals
from router.replica_pool import DEAD, Replica, ReplicaPool
from router.stream_watch import ReplicaLost as ReplicaLost  # the flow catches it from here
from router.stream_watch import next_event
from router.validation import ValidatedRequest
from router.wait_queue import PREFILL_ROOM, QueueOrder, WaitQueue


@dataclass
class TokenEvent:
    token_ids: list[int]
    # "stop" / "length" when the model side ended the request with these tokens.
    finish_reason: str = ""
    # One per token id when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class AttemptReport:
    """What the final message says about the attempt that finished the request."""

    timings: dict[str, float] = field(default_factory=dict)
    prefill_replica: str = ""
    decode_replica: str = ""
    kv_transport: str = ""
    kv_bytes: int = 0
    # Prompt tokens the prefill replica took from its prefix cache.
    num_cached_tokens: int = 0
    # Seconds this attempt waited in the router queue (for decode blocks or a colocated
    # replica's room); the flow adds them to the request's `queue_s`.
    queued_s: float = 0.0


class Attempt:
    def __init__(
        self,
        config: PdserveConfig,
        pools: tuple[ReplicaPool, ReplicaPool],
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
        """`admitted_at` is the request's admission time (`router.admission`), the same for
        every attempt of the request; `wait_queue` is the router's one queue; `reader` the
        request's reader state, told to the decode replica (`router.reader_pace`)."""
        self._config = config
        self._metrics = metrics
        self._prefill_pool, self._decode_pool = pools
        self._eos_token_ids = eos_token_ids
        self._request = request
        self._previous = list(previous_tokens)
        self._request_id = request_id
        self._deadline = deadline
        self._admitted_at = admitted_at
        self._wait_queue = wait_queue
        self._reader = reader or ReaderPace()
        self._stop_telling: Callable[[], None] | None = None
        # Minted here, per attempt: a retried or migrated request never reuses KV state.
        self.transfer_id = uuid.uuid4().hex
        self.report = AttemptReport()
        self._prefill: Replica | None = None
        self._decode: Replica | None = None
        self._streams: list[EventStream] = []
        # Epoch of each replica when this attempt used it: a restart loses the attempt.
        self._placed_epochs: dict[str, str] = {}
        self._finished = False
        self._reservation = DecodeReservation(
            config, self._decode_pool, request, len(self._previous),
            (request_id, self.transfer_id), deadline,
            QueueOrder(request.priority, admitted_at), wait_queue,
        )

    async def tokens(self) -> AsyncGenerator[TokenEvent, None]:
        """Yields new tokens; the last event carries a finish reason."""
        self._decode, self.report.queued_s = await self._reservation.reserve()
        self._stop_telling = self._reader.tell(self._decode, self.transfer_id)
        prefill, first, prefill_request = await self._start_prefill()
        self._wait_queue.notify()  # a place in a prefill queue is free again
        self.report.timings.update(queue_s=first.queue_s, prefill_s=first.prefill_s)
        self.report.num_cached_tokens = first.num_cached_tokens
        first_logprobs = [first.logprobs] if first.logprobs is not None else []
        if first.finished:
            # Decode never starts: close() aborts its reservation.
            yield TokenEvent([first.token_id], self._first_token_reason(first), first_logprobs)
            return
        yield TokenEvent([first.token_id], logprobs=first_logprobs)
        decode = self._open(self._decode, "generate", DecodeEvent, self._decode_request())
        handed_off = await self._hand_off(prefill, prefill_request.kv_target.transport)
        self.report.timings["kv_transfer_s"] = handed_off.transfer_s
        self.report.kv_transport = handed_off.transport
        self.report.kv_bytes = handed_off.num_bytes
        while True:
            event: DecodeEvent = await self._next(decode, self._decode)
            if event.finish_reason:
                self.report.timings["decode_s"] = event.decode_s
                self._finished = True
            if event.token_ids or event.finish_reason:
                yield TokenEvent(event.token_ids, event.finish_reason, event.logprobs)
            if event.finish_reason:
                return
            if event.preempted:
                raise Preempted(self._decode.replica_id)

    def close(self) -> None:
        """Cancels the streams; aborts the transfer on every replica that may hold something
        for it (once the attempt finished: only where a reservation went unanswered); signals
        the router queue when decode blocks were (or may have been) reserved. Never blocks."""
        for stream in self._streams:
            stream.close()
        if self._stop_telling is not None:
            self._stop_telling()
        decode_asked = [self._decode] if self._decode else []
        decode_asked += self._reservation.unanswered
        # A reservation that never answered may land later, even after the attempt finished
        # on another replica: its transfer id is aborted there whatever the outcome.
        to_abort = self._reservation.unanswered
        if not self._finished:
            to_abort += [replica for replica in (self._prefill, self._decode) if replica]
        for replica in to_abort:
            if replica.state != DEAD:
                replica.handle.abort.remote(self.transfer_id)
        if decode_asked:
            self._wait_queue.notify()
        self.report.prefill_replica = self._prefill.replica_id if self._prefill else ""
        self.report.decode_replica = self._decode.replica_id if self._decode else ""

    async def _hand_off(self, prefill: EventStream, transport: str) -> PrefillEvent:
        """Waits for prefill's `transferred` event; counts the hand-off or its failure."""
        assert self._prefill is not None, "placed first"
        try:
            event: PrefillEvent = await self._next(prefill, self._prefill)
        except PdserveError as exc:
            self._metrics.count_kv_transfer_failure(transport, exc.code.value)
            raise
        self._metrics.observe_kv_transfer(event.transport, event.num_bytes, event.transfer_s)
        return event

    def _first_token_reason(self, first: PrefillEvent) -> str:
        num_generated = len(self._previous) + 1
        return "length" if num_generated >= self._request.sampling.max_tokens else "stop"

    async def _next(self, stream: EventStream, replica: Replica) -> Any:
        """The stream's next event; raises its error, or ReplicaLost when the replica died,
        restarted or stopped answering the router's polls while the stream waited."""
        return await next_event(
            stream, replica, self._placed_epochs.get(replica.replica_id, replica.epoch),
            self._deadline, self._config.timeouts.load_poll_interval_s,
        )

    def _open(
        self, replica: Replica, method: str, event_type: type, message: object
    ) -> EventStream:
        self._placed_epochs.setdefault(replica.replica_id, replica.epoch)
        stream = EventStream(
            getattr(replica.handle, method), event_type, encode(message),
            f"{replica.replica_id}.{method}",
        )
        self._streams.append(stream)
        return stream

    async def _start_prefill(self) -> tuple[EventStream, PrefillEvent, PrefillRequest]:
        """Opens prefill on the least-loaded prefill replica whose queue takes the request,
        waiting in the router queue (holding the decode reservation) while every queue is
        full; returns the stream, its first event and the request sent."""
        order = QueueOrder(self._request.priority, self._admitted_at)
        started, queued_s = await self._wait_queue.take(
            self._try_prefill, order, self._deadline, PREFILL_ROOM, bounded=False
        )
        self.report.queued_s += queued_s
        return started

    async def _try_prefill(self) -> tuple[EventStream, PrefillEvent, PrefillRequest]:
        """One round over the ready prefill replicas, fewest pending requests first. A replica
        whose queue is full (RESOURCE_EXHAUSTED, its only event) holds nothing: the next one
        is tried; see `router.refusals` for what the round raises when none took it."""
        refusals = Refusals("prefill")
        for replica in self._prefill_pool.by_least_loaded():
            self._prefill = replica
            replica.num_placed_since_report += 1
            request = self._prefill_request()
            stream = self._open(replica, "prefill", PrefillEvent, request)
            try:
                return stream, await self._next(stream, replica), request
            except (ResourceExhausted, InvalidArgument) as exc:
                refusals.add(exc)
                replica.num_placed_since_report -= 1
                stream.close()
                self._streams.remove(stream)
                self._prefill = None
        raise refusals.verdict(
            f"room in its queue for {self._request.num_prompt_tokens + len(self._previous)} "
            "prompt tokens"
        )

    def _prefill_request(self) -> PrefillRequest:
        assert self._prefill is not None and self._decode is not None, "placed first"
        decode_load = self._decode.load
        target = KVTarget(
            replica_id=self._decode.replica_id,
            address=decode_load.kv_address if decode_load else "",
            transport=kv_transport_for(
                self._config.kv_transfer.transport, self._prefill.node_id, self._decode.node_id
            ),
        )
        return PrefillRequest(
            request_id=self._request_id, transfer_id=self.transfer_id,
            prompt_token_ids=self._request.prompt_token_ids + self._previous,
            sampling=self._request.sampling, eos_token_ids=self._eos_token_ids,
            kv_target=target, deadline=self._deadline, num_previous_tokens=len(self._previous),
        )

    def _decode_request(self) -> DecodeRequest:
        return DecodeRequest(
            request_id=self._request_id, transfer_id=self.transfer_id,
            sampling=self._request.sampling, eos_token_ids=self._eos_token_ids,
            deadline=self._deadline, num_previous_tokens=len(self._previous),
            prompt_first_token_id=self._request.prompt_token_ids[0],
            priority=self._request.priority, admitted_at=self._admitted_at,
        )

