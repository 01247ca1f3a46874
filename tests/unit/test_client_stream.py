"""`ClientStream` on its own: a bounded buffer in front of a slow client, a write that stalls
past `timeouts.client_stall_s` cancels the request (its chunks are closed, the stall counted),
a drain cut ends every unfinished choice with a final `cancelled` chunk, errors pass through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import pytest

from pdserve.errors import Unavailable
from pdserve.messages import SamplingParams
from pdserve.metrics import RouterMetrics
from router.choices import ChoiceChunk
from router.client_stream import ClientStream, OpenStreams, StreamEnd
from router.request_flow import Completion, StreamChunk
from router.validation import ValidatedRequest
from tests.factories.config import make_config
from tests.unit.test_metrics import value

CONFIG = make_config(
    "unused", timeouts={"client_stall_s": 0.5, "reader_slow_s": 0.1},
    router={"max_buffered_messages": 4},
)
WAIT_S = 10.0


@dataclass
class Chunks:
    """A request's chunks: `num_tokens` one-token chunks per choice, then its final one; it
    records how far it got and whether it was closed early."""

    num_choices: int = 1
    num_tokens: int = 100
    fail_after: int | None = None
    num_produced: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False

    async def stream(self) -> AsyncGenerator[ChoiceChunk, None]:
        try:
            for position in range(self.num_tokens):
                for index in range(self.num_choices):
                    if self.fail_after is not None and self.num_produced == self.fail_after:
                        raise Unavailable("decode-0 failed after 3 tokens were sent")
                    self.num_produced += 1
                    yield ChoiceChunk(index, StreamChunk([position], f"t{position} "))
            for index in range(self.num_choices):
                yield ChoiceChunk(index, StreamChunk([], "", _completion(f"r-{index}")))
            self.finished = True
        finally:
            if not self.finished:
                self.closed.set()


@dataclass
class Client:
    """The written chunks; writes block while `reading` is clear."""

    reading: asyncio.Event = field(default_factory=asyncio.Event)
    written: list[ChoiceChunk] = field(default_factory=list)

    async def write(self, item: ChoiceChunk) -> None:
        await self.reading.wait()
        self.written.append(item)


def _completion(request_id: str) -> Completion:
    return Completion(request_id, "length", 3, 100, {}, "disaggregated", "grpc", "p", "d", 1)


def _request(num_choices: int = 1) -> ValidatedRequest:
    return ValidatedRequest(
        list(range(7)), SamplingParams(max_tokens=100), [], None, num_choices=num_choices
    )


def _stream(metrics: RouterMetrics, streams: OpenStreams, num_choices: int = 1) -> ClientStream:
    return ClientStream(_request(num_choices), "req1", "grpc", CONFIG, metrics, streams)


async def test_a_client_that_keeps_up_gets_every_chunk() -> None:
    chunks, client, streams = Chunks(num_choices=2, num_tokens=20), Client(), OpenStreams()
    client.reading.set()
    end = await _stream(RouterMetrics(), streams, 2).send(chunks.stream(), client.write)
    assert end is StreamEnd.FINISHED and end.outcome == "OK"
    assert len(client.written) == 2 * 20 + 2 and chunks.finished
    assert len(streams) == 0


async def test_a_stalled_client_cancels_the_request_and_bounds_the_buffer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chunks, client, metrics = Chunks(), Client(), RouterMetrics()
    end = await asyncio.wait_for(
        _stream(metrics, OpenStreams()).send(chunks.stream(), client.write), WAIT_S
    )
    assert end is StreamEnd.STALLED and end.outcome == "CANCELLED"
    assert chunks.closed.is_set()  # the request's work was aborted before send returned
    # The write in progress, 4 buffered, one more waiting for room: nothing further was read.
    assert chunks.num_produced <= 1 + 4 + 1
    assert value(metrics.registry, "pdserve_router_client_stalls_total", api="grpc") == 1
    assert "request req1 (grpc): the client accepted no data" in caplog.text


async def test_a_slow_but_steady_client_is_not_a_stall() -> None:
    chunks, client, metrics = Chunks(num_tokens=10), Client(), RouterMetrics()

    async def read_slowly() -> None:
        while not chunks.finished:
            client.reading.set()
            await asyncio.sleep(0)
            client.reading.clear()
            await asyncio.sleep(0.05)  # well under the 0.5 s stall limit
        client.reading.set()

    reader = asyncio.create_task(read_slowly())
    end = await asyncio.wait_for(
        _stream(metrics, OpenStreams()).send(chunks.stream(), client.write), WAIT_S
    )
    await reader
    assert end is StreamEnd.FINISHED and len(client.written) == 11
    assert value(metrics.registry, "pdserve_router_client_stalls_total", api="grpc") == 0


async def test_a_cut_aborts_the_work_then_ends_every_unfinished_choice() -> None:
    chunks, client, streams = Chunks(num_choices=2), Client(), OpenStreams()
    client.reading.set()
    first_written = asyncio.Event()

    async def write(item: ChoiceChunk) -> None:
        await client.write(item)
        if len(client.written) == 4:
            first_written.set()
            client.reading.clear()  # the client then waits for more; the cut comes meanwhile
            await asyncio.sleep(0.05)
            client.reading.set()

    sending = asyncio.create_task(_stream(RouterMetrics(), streams, 2).send(chunks.stream(), write))
    await asyncio.wait_for(first_written.wait(), WAIT_S)
    assert await streams.cut(WAIT_S)
    end = await sending
    assert end is StreamEnd.CUT and end.outcome == "CANCELLED"
    assert chunks.closed.is_set()
    finals = [item for item in client.written if item.chunk.completion is not None]
    assert [item.index for item in finals] == [0, 1]
    tokens = [item for item in client.written if item.chunk.token_ids]
    for final in finals:
        completion = final.chunk.completion
        assert completion is not None
        assert completion.finish_reason == "cancelled"
        assert completion.request_id == f"req1-{final.index}"
        assert completion.num_prompt_tokens == 7
        assert completion.num_completion_tokens == sum(
            1 for item in tokens if item.index == final.index
        )
    assert client.written[-2:] == finals  # nothing after the finals


async def test_a_stream_opened_after_the_cut_is_cut_at_once() -> None:
    streams = OpenStreams()
    assert await streams.cut(WAIT_S)
    client = Client()
    client.reading.set()
    chunks = Chunks()
    end = await _stream(RouterMetrics(), streams).send(chunks.stream(), client.write)
    assert end is StreamEnd.CUT
    (final,) = client.written
    assert final.chunk.completion is not None
    assert final.chunk.completion.request_id == "req1"
    assert final.chunk.completion.num_completion_tokens == 0


async def test_an_error_is_raised_after_the_chunks_before_it() -> None:
    chunks, client = Chunks(fail_after=3), Client()
    client.reading.set()
    with pytest.raises(Unavailable):
        await _stream(RouterMetrics(), OpenStreams()).send(chunks.stream(), client.write)
    assert len(client.written) == 3


async def test_cancelling_the_caller_closes_the_chunks() -> None:
    chunks, client = Chunks(), Client()
    client.reading.set()
    blocked = asyncio.Event()

    async def write(item: ChoiceChunk) -> None:
        blocked.set()
        await asyncio.Event().wait()  # a write that only a cancel ends

    stream = _stream(RouterMetrics(), OpenStreams())
    sending = asyncio.create_task(stream.send(chunks.stream(), write))
    await asyncio.wait_for(blocked.wait(), WAIT_S)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await asyncio.wait_for(chunks.closed.wait(), WAIT_S)
