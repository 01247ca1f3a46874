"""Sending one request's chunks to its client: a bounded buffer, stalled readers, drain cuts.

Both public APIs send through a `ClientStream` (`FrontDoor.client_stream`). A producer task
reads the request's chunks (`FrontDoor.generate`) into a buffer of at most
`router.max_buffered_messages` chunks; while it is full the producer reads nothing more, so a
slow client costs the router a bounded amount of memory. The caller's task writes the chunks
with its API's `write` (gRPC `context.write`, one SSE event), which blocks while the client
accepts no data: no HTTP/2 flow-control window, an unread socket.

- **Slow reader.** A write still waiting after `timeouts.reader_slow_s` marks the request's
  reader stalled (`ReaderPace`) until that write completes: the replicas holding its sequences
  serve it last, so it is their first preemption victim and its KV goes to clients that read.
- **Stalled client.** A write that has not completed after `timeouts.client_stall_s` ends the
  stream as `STALLED`: the producer is cancelled, which closes the generator and so aborts the
  request's work on the replicas and frees its decode KV; the stall is logged with the request
  id and counted (`pdserve_router_client_stalls_total`). What happens to the connection is the
  API's business: grpc-python gives a server no way to reset one HTTP/2 stream, so the gRPC call
  keeps its one unsent message until the client's deadline or disconnect; the HTTP API aborts
  its connection.
- **Drain cut.** `OpenStreams.cut` (the end of a drain's grace) cuts every open stream: its
  producer is cancelled the same way (the replicas' work is aborted first), the chunks already
  buffered are written, then every choice that had not finished gets a final chunk with finish
  reason `cancelled`, its request id and its usage (the tokens written), so the client sees a
  proper end instead of a transport error. Text a choice held back (a possible stop string, an
  incomplete UTF-8 sequence) is dropped; its token ids were sent.

Event loop only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from pdserve.config import PdserveConfig
from pdserve.errors import StatusCode
from pdserve.futures import wait_within
from pdserve.metrics import RouterMetrics
from router.choices import ChoiceChunk, choice_request_id
from router.reader_pace import ReaderPace
from router.request_flow import Completion, StreamChunk
from router.validation import ValidatedRequest

logger = logging.getLogger(__name__)

Write = Callable[[ChoiceChunk], Awaitable[None]]

# How long a drain waits, after cutting the streams still open, for them to send their final
# messages (each write is also bounded by `timeouts.client_stall_s`).
CUT_WAIT_S = 5.0


class StreamEnd(enum.Enum):
    # Every choice sent its own final chunk.
    FINISHED = "finished"
    # A drain cut it: every unfinished choice ended with finish reason `cancelled`.
    CUT = "cut"
    # The client accepted no data for `timeouts.client_stall_s`; the request was cancelled.
    STALLED = "stalled"

    @property
    def outcome(self) -> str:
        """What `pdserve_router_requests_total` counts the request as."""
        return "OK" if self is StreamEnd.FINISHED else StatusCode.CANCELLED.value


@dataclass(frozen=True)
class _Ended:
    """The producer's last item: the chunks ran out (`error` None) or raised `error`."""

    error: BaseException | None = None


class _Cut:
    """Put in the buffer by `ClientStream.cut`."""


class ClientStream:
    def __init__(
        self,
        request: ValidatedRequest,
        request_id: str,
        api: str,
        config: PdserveConfig,
        metrics: RouterMetrics,
        streams: OpenStreams,
    ) -> None:
        """`api` names the public API in logs and metrics ("grpc", "http"); `streams` is the
        front door's registry, which a drain cuts."""
        self._request = request
        self._request_id = request_id
        self._api = api
        self._mode = config.mode
        self._stall_s = config.timeouts.client_stall_s
        self._slow_s = config.timeouts.reader_slow_s
        # Whether the client reads: set by the writes, told to the replicas by the attempts.
        self.reader = ReaderPace()
        self._metrics = metrics
        self._streams = streams
        # Chunks and control items; the semaphore bounds the chunks only, so that a cut or the
        # producer's end never waits for room.
        self._buffer: asyncio.Queue[ChoiceChunk | _Ended | _Cut] = asyncio.Queue()
        self._room = asyncio.Semaphore(config.router.max_buffered_messages)
        self._producer: asyncio.Task[None] | None = None
        self._producer_cancelled = False
        self._started = time.monotonic()
        self._num_tokens_written = [0] * request.num_choices
        self._finished: set[int] = set()
        self._cut = False

    async def send(self, chunks: AsyncGenerator[ChoiceChunk, None], write: Write) -> StreamEnd:
        """Writes `chunks` with `write` until they end, the client stalls or a drain cuts the
        stream. Raises what the chunks raise (after writing the chunks before it). However it
        ends, `chunks` is closed first, which aborts the request's work on the replicas."""
        self._producer = asyncio.create_task(self._produce(chunks))
        self._streams.add(self)
        try:
            while True:
                item = await self._buffer.get()
                if isinstance(item, ChoiceChunk):
                    self._room.release()
                    if not await self._write(write, item):
                        return await self._stalled()
                elif isinstance(item, _Cut):
                    await self._stop_producer()
                    return await self._end_cut(write)
                elif item.error is not None:
                    raise item.error
                else:
                    return StreamEnd.FINISHED
        finally:
            await self._stop_producer()
            self._streams.discard(self)

    def cut(self) -> None:
        """Ends the stream at its next step (see the module docstring); idempotent."""
        if self._cut:
            return
        self._cut = True
        self._cancel_producer()  # stops the replicas' work now, however slow the client is
        self._buffer.put_nowait(_Cut())

    async def write_within_stall(self, write: Awaitable[None]) -> bool:
        """Awaits one write of the API's own (a closing event) under the stall limit; False,
        logged and counted as a stall, when the client took nothing for `client_stall_s`."""
        try:
            await wait_within(write, self._stall_s)
        except asyncio.TimeoutError:
            self._count_stall()
            return False
        return True

    async def _produce(self, chunks: AsyncGenerator[ChoiceChunk, None]) -> None:
        error: BaseException | None = None
        try:
            async for item in chunks:
                await self._room.acquire()
                self._buffer.put_nowait(item)
        except asyncio.CancelledError as exc:
            error = exc
            raise
        except Exception as exc:  # handed to the writer, which raises it
            error = exc
        finally:
            try:
                # Aborts every choice's work on the replicas (see `FrontDoor.generate`).
                await chunks.aclose()
            finally:
                self._buffer.put_nowait(_Ended(error))

    def _cancel_producer(self) -> None:
        """Cancels the producer once: a second cancel would interrupt its clean-up."""
        producer = self._producer
        if producer is not None and not self._producer_cancelled:
            self._producer_cancelled = True
            producer.cancel()

    async def _stop_producer(self) -> None:
        """Cancels the producer and waits until it has closed the chunks. A cancel of the
        caller meanwhile leaves the producer's clean-up running."""
        producer = self._producer
        if producer is not None and not producer.done():
            self._cancel_producer()
            await asyncio.wait({producer})

    async def _write(self, write: Write, item: ChoiceChunk) -> bool:
        """Writes one chunk; False when the client accepted nothing for `client_stall_s`.
        A write still waiting after `reader_slow_s` marks the reader stalled until it
        completes."""
        writing = asyncio.ensure_future(write(item))
        try:
            done, _ = await asyncio.wait({writing}, timeout=self._slow_s)
            if not done:
                self.reader.set_stalled(True)
                await wait_within(writing, self._stall_s - self._slow_s)
            writing.result()
        except asyncio.TimeoutError:
            return False
        finally:
            writing.cancel()  # a no-op once it completed
        self.reader.set_stalled(False)
        self._num_tokens_written[item.index] += len(item.chunk.token_ids)
        if item.chunk.completion is not None:
            self._finished.add(item.index)
        return True

    async def _stalled(self) -> StreamEnd:
        await self._stop_producer()
        self._count_stall()
        return StreamEnd.STALLED

    def _count_stall(self) -> None:
        self._metrics.count_client_stall(self._api)
        logger.warning(
            "request %s (%s): the client accepted no data for %.1f s (timeouts.client_stall_s) "
            "after %d tokens; cancelled", self._request_id, self._api, self._stall_s,
            sum(self._num_tokens_written),
        )

    async def _end_cut(self, write: Write) -> StreamEnd:
        """After a cut: the chunks already buffered, then a final chunk for each choice that
        has not sent its own."""
        while not self._buffer.empty():
            item = self._buffer.get_nowait()
            if isinstance(item, ChoiceChunk) and not await self._write(write, item):
                return await self._stalled()
        unfinished = [i for i in range(self._request.num_choices) if i not in self._finished]
        for index in unfinished:
            if not await self._write(write, self._cut_chunk(index)):
                return await self._stalled()
        if not unfinished:
            return StreamEnd.FINISHED
        logger.info(
            "request %s (%s): cut by the drain after %d tokens", self._request_id, self._api,
            sum(self._num_tokens_written),
        )
        return StreamEnd.CUT

    def _cut_chunk(self, index: int) -> ChoiceChunk:
        """Choice `index`'s final chunk after a cut: finish reason `cancelled`, its request id
        and usage; which replicas served it is not known here."""
        completion = Completion(
            request_id=choice_request_id(self._request_id, index, self._request.num_choices),
            finish_reason="cancelled",
            num_prompt_tokens=self._request.num_prompt_tokens,
            num_completion_tokens=self._num_tokens_written[index],
            timings={"total_s": time.monotonic() - self._started},
            mode=self._mode,
            kv_transport="",
            prefill_replica="",
            decode_replica="",
            kv_bytes=0,
        )
        return ChoiceChunk(index, StreamChunk([], "", completion))


class OpenStreams:
    """The client streams being sent now, so that a drain can cut them. Event loop only."""

    def __init__(self) -> None:
        self._streams: set[ClientStream] = set()
        self._none_open = asyncio.Event()
        self._none_open.set()
        self._cutting = False

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: ClientStream) -> None:
        """Registers a stream; one opened after a cut is cut at once."""
        self._streams.add(stream)
        self._none_open.clear()
        if self._cutting:
            stream.cut()

    def discard(self, stream: ClientStream) -> None:
        self._streams.discard(stream)
        if not self._streams:
            self._none_open.set()

    async def wait_none_open(self) -> None:
        await self._none_open.wait()

    async def cut(self, timeout_s: float) -> bool:
        """Cuts every open stream (and any opened later); waits up to `timeout_s` for them to
        end. Returns whether they all did."""
        self._cutting = True
        for stream in list(self._streams):
            stream.cut()
        try:
            await wait_within(self._none_open.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True
