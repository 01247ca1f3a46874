"""The one request path behind both public APIs (gRPC `Generate` and the OpenAI HTTP API).

Each API is a thin adapter: it turns its wire format into a `GenerateInput`, then calls
`validate`, `deadline` and `generate` here, and maps the `PdserveError`s they raise to its own
statuses. What is decided here is decided once for both: validation (chat rendering and
tokenizing included), the deadline policy, admission and the flow.

Validation: the checks that need no tokens run on the event loop, among them a character bound
that refuses a prompt too long to fit the context before any tokenizing. Rendering and
tokenizing a prompt longer than `INLINE_PROMPT_CHARS` then runs in the front door's thread pool
(`router.tokenizer_threads` threads; the tokenizer releases the GIL), so a flood of huge prompts
queues there while health, `Info` and every stream keep the loop.

Admission: a request (all its choices at once) takes in-flight slots, at most
`router.max_inflight_requests` in all. When they are not free, it waits in the router queue
(`router.wait_queue`: priority, then arrival) until a finishing request frees them, its
deadline passes (DEADLINE_EXCEEDED) or its client goes (cancelled); RESOURCE_EXHAUSTED only
when that queue is full. Its `Admission` (arrival time, time queued) goes with it into the flow.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

from pdserve.config import PdserveConfig
from pdserve.errors import ResourceExhausted, Unavailable
from pdserve.futures import wait_within
from pdserve.metrics import RouterMetrics
from router.admission import Admission, AdmissionClock
from router.choices import ChoiceChunk, stream_choices
from router.client_stream import CUT_WAIT_S, ClientStream, OpenStreams
from router.generate_input import GenerateInput
from router.reader_pace import ReaderPace
from router.request_flow import RequestFlow
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest, check_request, tokenize_request
from router.wait_queue import IN_FLIGHT_SLOT, QueueOrder

# Prompts up to this many characters (token ids: always) are rendered and tokenized on the event
# loop: a millisecond or two at most, less than the hop to a thread, and they never wait
# behind huge prompts queued in the pool.
INLINE_PROMPT_CHARS = 1024


def new_request_id() -> str:
    """A globally unique request id (never the client's)."""
    return uuid.uuid4().hex


class FrontDoor:
    """Validates, admits and runs requests for the public APIs.

    Owns the in-flight count, the admission clock, the draining flag and the tokenizing threads
    (`close` stops them); lives on the router's event loop (every method is called from it).
    `validate` raises `InvalidArgument`; `generate` raises `ResourceExhausted` when the
    router queue is full (or the request has more choices than in-flight slots exist),
    `DeadlineExceeded` when its deadline passes while queued and `Unavailable` while draining."""

    def __init__(
        self,
        config: PdserveConfig,
        tokenizer: RouterTokenizer,
        flow: RequestFlow,
        metrics: RouterMetrics | None = None,
    ) -> None:
        """Slots are waited for in `flow.wait_queue`, the queue the flow's attempts wait in
        for decode room: one queue, one order."""
        self._config = config
        self._tokenizer = tokenizer
        self._flow = flow
        self.max_context_tokens = min(
            config.model.max_context_tokens, tokenizer.max_context_tokens
        )
        self._queue = flow.wait_queue
        self._clock = AdmissionClock()
        # Sequences admitted and not yet finished (a request with n choices counts n).
        self.num_inflight = 0
        metrics = metrics or RouterMetrics()
        metrics.watch_inflight(lambda: self.num_inflight)
        metrics.watch_queue(lambda: self._queue.num_queued)
        self._metrics = metrics
        # The streams being sent to clients: the end of a drain cuts them.
        self._streams = OpenStreams()
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tokenizing = ThreadPoolExecutor(
            config.router.tokenizer_threads, thread_name_prefix="router-tokenize"
        )

    @property
    def tokenizer(self) -> RouterTokenizer:
        return self._tokenizer

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_queued(self) -> int:
        """Requests waiting in the router queue now (for a slot or for decode room)."""
        return self._queue.num_queued

    async def validate(self, request: GenerateInput) -> ValidatedRequest:
        """See `router.validation`: the cheap checks here, rendering and tokenizing a long
        prompt in the thread pool (cancelling the caller drops it if it has not started)."""
        args = (request, self._tokenizer, self._config.limits, self.max_context_tokens)
        check_request(*args)
        if request.num_prompt_chars <= INLINE_PROMPT_CHARS:
            return tokenize_request(*args)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, tokenize_request, *args
        )

    def deadline(self, client_timeout_s: float | None) -> float:
        """Wall-clock deadline: the client's timeout capped by config; the default if unset."""
        timeouts = self._config.timeouts
        seconds = timeouts.default_deadline_s if client_timeout_s is None else client_timeout_s
        return time.time() + min(seconds, timeouts.max_deadline_s)

    async def generate(
        self,
        request: ValidatedRequest,
        deadline: float,
        request_id: str,
        reader: ReaderPace | None = None,
    ) -> AsyncGenerator[ChoiceChunk, None]:
        """Admits the request (all its choices or none, waiting in the router queue while the
        in-flight slots are taken) and streams its choices' chunks; each choice ends with a
        chunk carrying its `Completion`. Raises a `PdserveError` when it fails. Close the
        generator (`aclose`) or cancel its consumer to cancel: a queued request leaves the
        queue, and every choice's work on the replicas is aborted before `aclose` returns.
        `reader` is the client stream's reader state (`ClientStream.reader`), told to the
        replicas; None: the caller reads at once."""
        admission = await self._admit(request, deadline, reader or ReaderPace())
        try:
            async for chunk in stream_choices(
                self._flow, request, deadline, request_id, admission,
                max_buffered=self._config.router.max_buffered_messages,
            ):
                yield chunk
        finally:
            self._release(request.num_choices)

    async def drain(self, grace_s: float) -> bool:
        """Refuses new requests (and those queued for a slot) and waits up to `grace_s` for
        in-flight ones to finish and their streams to be sent; then cuts the rest (`cut`).
        Returns whether they all finished."""
        self._draining = True
        self._queue.refuse(IN_FLIGHT_SLOT, _shutting_down())
        try:
            await wait_within(self._quiet(), grace_s)
        except asyncio.TimeoutError:
            await self.cut()
            return False
        return True

    def client_stream(self, request: ValidatedRequest, request_id: str, api: str) -> ClientStream:
        """What an API sends `generate`'s chunks to its client through: bounded buffering,
        stalled clients and drain cuts (`router.client_stream`). `api` names the API in logs
        and metrics."""
        return ClientStream(
            request, request_id, api, self._config, self._metrics, self._streams
        )

    async def cut(self, timeout_s: float = CUT_WAIT_S) -> bool:
        """Ends every open stream now (and any opened later): its work on the replicas is
        aborted, and each of its choices that had not finished gets a final chunk with finish
        reason `cancelled`, its request id and usage. Waits up to `timeout_s` for the streams
        to end; returns whether they all did."""
        return await self._streams.cut(timeout_s)

    async def _quiet(self) -> None:
        """Returns once no request is in flight and no stream is open."""
        await self._idle.wait()
        await self._streams.wait_none_open()

    def close(self) -> None:
        """Stops the tokenizing threads (call once the APIs stopped serving); a tokenization
        in progress finishes in the background, queued ones are dropped."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _admit(
        self, request: ValidatedRequest, deadline: float, reader: ReaderPace
    ) -> Admission:
        """Takes the request's in-flight slots, queueing while they are not free."""
        if self._draining:
            raise _shutting_down()
        num_sequences = request.num_choices
        limit = self._config.router.max_inflight_requests
        if num_sequences > limit:
            raise ResourceExhausted(
                f"{num_sequences} choices exceed router.max_inflight_requests ({limit})"
            )
        admitted_at, started = self._clock.next(), time.monotonic()

        async def take_slots() -> None:
            self._take_slots(num_sequences)

        _, queued_s = await self._queue.take(
            take_slots, QueueOrder(request.priority, admitted_at), deadline, IN_FLIGHT_SLOT
        )
        return Admission(admitted_at, started, queued_s, reader)

    def _take_slots(self, num_sequences: int) -> None:
        if self._draining:
            raise _shutting_down()
        if self.num_inflight + num_sequences > self._config.router.max_inflight_requests:
            raise ResourceExhausted(f"router at capacity ({self.num_inflight} requests in flight)")
        self.num_inflight += num_sequences
        self._idle.clear()

    def _release(self, num_sequences: int) -> None:
        self.num_inflight -= num_sequences
        if not self.num_inflight:
            self._idle.set()
        self._queue.notify()  # a slot is free: the head may take it


def _shutting_down() -> Unavailable:
    return Unavailable("the server is shutting down")
