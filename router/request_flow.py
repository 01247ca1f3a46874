"""The life of one request inside the router.

1. **Place.** Mint the request id and the transfer id (never the client's). Reserve KV blocks on
   the decode replica with the most free blocks (the next one if it is full: back-pressure
   comes from decode capacity), then pick the least-loaded prefill replica.
2. **Prefill.** Stream `PrefillRequest` to it; its first event carries the first token, which
   is detokenized and sent to the client at once (the first token comes from prefill).
3. **Hand-off + decode.** Open the decode replica's token stream; the prefill stream's second
   event says the KV reached the decode replica (bytes, time, transport).
4. **Stream.** Detokenize decode tokens incrementally, honour stop strings, stop at the
   deadline, and end with a `Completion`.
5. **Clean up.** Whatever ends the request early (client cancel, deadline, error, stop string,
   a finished first token), both replicas are told to abort the transfer id, which frees the
   prefill lease and the decode blocks at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from pdserve.config import PdserveConfig
from pdserve.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    PdserveError,
    ResourceExhausted,
    StatusCode,
    Unavailable,
    error_from_info,
)
from pdserve.messages import (
    DecodeEvent,
    DecodeRequest,
    KVTarget,
    PrefillEvent,
    PrefillRequest,
    ReserveReply,
    ReserveRequest,
    encode,
)
from router.ray_calls import EventStream, call_message
from router.replica_pool import Replica, ReplicaPool
from router.text_output import TextOutput
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest

logger = logging.getLogger(__name__)

CONTROL_CALL_TIMEOUT_S = 10.0


@dataclass
class Completion:
    """What the final message reports."""

    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_completion_tokens: int
    timings: dict[str, float]
    mode: str
    kv_transport: str
    prefill_replica: str
    decode_replica: str
    kv_bytes: int


@dataclass
class StreamChunk:
    token_ids: list[int]
    text: str
    completion: Completion | None = None


@dataclass
class _Progress:
    """What is known about one request as it moves; used for the final report."""

    request_id: str
    transfer_id: str
    admitted_at: float
    timings: dict[str, float] = field(default_factory=dict)
    prefill_replica: Replica | None = None
    decode_replica: Replica | None = None
    kv_transport: str = ""
    kv_bytes: int = 0


class RequestFlow:
    def __init__(
        self,
        config: PdserveConfig,
        tokenizer: RouterTokenizer,
        prefill_pool: ReplicaPool,
        decode_pool: ReplicaPool,
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._prefill_pool = prefill_pool
        self._decode_pool = decode_pool

    async def run(self, request: ValidatedRequest, deadline: float) -> AsyncIterator[StreamChunk]:
        """Streams one request; raises a PdserveError on failure. `deadline` is wall-clock."""
        progress = _Progress(uuid.uuid4().hex, uuid.uuid4().hex, time.monotonic())
        log_prefix = f"request {progress.request_id}"
        prefill_stream: EventStream | None = None
        decode_stream: EventStream | None = None
        completed = False
        try:
            progress.decode_replica = await self._reserve(request, progress, deadline)
            progress.prefill_replica = self._prefill_pool.by_least_loaded()[0]
            progress.prefill_replica.num_placed_since_report += 1
            prefill_stream = self._start_prefill(request, progress, deadline)
            text = TextOutput(self._tokenizer, request.prompt_token_ids, request.stop)
            first: PrefillEvent = _checked(await prefill_stream.next(_seconds_left(deadline)))
            progress.timings.update(queue_s=first.queue_s, prefill_s=first.prefill_s)
            progress.timings["time_to_first_token_s"] = time.monotonic() - progress.admitted_at
            yield StreamChunk([first.token_id], text.push([first.token_id]))
            finish_reason = "length" if request.sampling.max_tokens == 1 else "stop"
            if not first.finished and not text.stopped:
                decode_stream = self._start_decode(request, progress, deadline)
                handed_off: PrefillEvent = _checked(
                    await prefill_stream.next(_seconds_left(deadline))
                )
                progress.timings["kv_transfer_s"] = handed_off.transfer_s
                progress.kv_transport = handed_off.transport
                progress.kv_bytes = handed_off.num_bytes
                finish_reason = ""
                async for chunk, reason in self._decode_tokens(
                    decode_stream, text, progress, deadline
                ):
                    if chunk.token_ids or chunk.text:
                        yield chunk
                    finish_reason = reason
                completed = not text.stopped
            completion = self._completion(progress, request, finish_reason, text)
            yield StreamChunk([], text.finish(), completion)
        finally:
            for stream in (prefill_stream, decode_stream):
                if stream is not None:
                    stream.close()
            if not completed:
                self._abort_everywhere(progress)
            logger.debug("%s done (completed=%s)", log_prefix, completed)

    async def _decode_tokens(
        self, stream: EventStream, text: TextOutput, progress: _Progress, deadline: float
    ) -> AsyncIterator[tuple[StreamChunk, str]]:
        while True:
            event: DecodeEvent = _checked(await stream.next(_seconds_left(deadline)))
            chunk = StreamChunk(event.token_ids, text.push(event.token_ids))
            if text.stopped:
                yield chunk, "stop"
                return
            yield chunk, event.finish_reason
            if event.finish_reason:
                progress.timings["decode_s"] = event.decode_s
                return

    async def _reserve(
        self, request: ValidatedRequest, progress: _Progress, deadline: float
    ) -> Replica:
        message = encode(
            ReserveRequest(
                request_id=progress.request_id, transfer_id=progress.transfer_id,
                num_prompt_tokens=request.num_prompt_tokens,
                max_tokens=request.sampling.max_tokens,
            )
        )
        last_error: PdserveError = Unavailable("no live decode replica")
        for replica in self._decode_pool.by_most_free_blocks():
            try:
                reply = await call_message(
                    replica.handle.reserve, ReserveReply, message,
                    timeout_s=min(CONTROL_CALL_TIMEOUT_S, _seconds_left(deadline)),
                    what=f"{replica.replica_id}.reserve",
                )
            except Unavailable as exc:
                last_error = exc
                continue
            if reply.ok:
                replica.num_placed_since_report += 1
                return replica
            assert reply.error is not None, "a refused reservation carries its error"
            last_error = error_from_info(reply.error)
            if last_error.code is not StatusCode.RESOURCE_EXHAUSTED:
                raise last_error
        if isinstance(last_error, ResourceExhausted):
            raise ResourceExhausted(
                f"no decode replica has room for {request.num_prompt_tokens} prompt + "
                f"{request.sampling.max_tokens} new tokens"
            )
        raise last_error

    def _start_prefill(
        self, request: ValidatedRequest, progress: _Progress, deadline: float
    ) -> EventStream:
        assert progress.prefill_replica and progress.decode_replica, "placed before prefill"
        decode_load = progress.decode_replica.load
        target = KVTarget(
            replica_id=progress.decode_replica.replica_id,
            address=decode_load.kv_address if decode_load else "",
            transport=kv_transport_for(
                self._config.kv_transfer.transport,
                progress.prefill_replica.node_id,
                progress.decode_replica.node_id,
            ),
        )
        message = PrefillRequest(
            request_id=progress.request_id, transfer_id=progress.transfer_id,
            prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
            eos_token_ids=self._tokenizer.eos_token_ids, kv_target=target, deadline=deadline,
        )
        replica = progress.prefill_replica
        return EventStream(
            replica.handle.prefill, PrefillEvent, encode(message), f"{replica.replica_id}.prefill"
        )

    def _start_decode(
        self, request: ValidatedRequest, progress: _Progress, deadline: float
    ) -> EventStream:
        assert progress.decode_replica is not None, "reserved before decode"
        message = DecodeRequest(
            request_id=progress.request_id, transfer_id=progress.transfer_id,
            sampling=request.sampling, eos_token_ids=self._tokenizer.eos_token_ids,
            deadline=deadline,
        )
        replica = progress.decode_replica
        return EventStream(
            replica.handle.generate, DecodeEvent, encode(message), f"{replica.replica_id}.generate"
        )

    def _abort_everywhere(self, progress: _Progress) -> None:
        for replica in (progress.prefill_replica, progress.decode_replica):
            if replica is not None:
                replica.handle.abort.remote(progress.transfer_id)

    def _completion(
        self, progress: _Progress, request: ValidatedRequest, finish_reason: str, text: TextOutput
    ) -> Completion:
        timings = dict(progress.timings)
        timings["total_s"] = time.monotonic() - progress.admitted_at
        return Completion(
            request_id=progress.request_id,
            finish_reason=finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_completion_tokens=text.num_tokens,
            timings=timings,
            mode=self._config.mode,
            kv_transport=progress.kv_transport,
            prefill_replica=progress.prefill_replica.replica_id if progress.prefill_replica else "",
            decode_replica=progress.decode_replica.replica_id if progress.decode_replica else "",
            kv_bytes=progress.kv_bytes,
        )


def kv_transport_for(configured: str, prefill_node: str, decode_node: str) -> str:
    """The transport for one hand-off: `auto` takes shared memory within a node and gRPC
    across nodes; an explicit `shm` across nodes is refused, never silently replaced."""
    same_node = bool(prefill_node) and prefill_node == decode_node
    if configured == "auto":
        return "shm" if same_node else "grpc"
    if configured == "shm" and not same_node:
        raise FailedPrecondition(
            "kv_transfer.transport is shm but the chosen prefill and decode replicas are on "
            "different nodes"
        )
    return configured


EventT = TypeVar("EventT", PrefillEvent, DecodeEvent)


def _checked(event: EventT) -> EventT:
    if event.error is not None:
        raise error_from_info(event.error)
    return event


def _seconds_left(deadline: float) -> float:
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded")
    return left
