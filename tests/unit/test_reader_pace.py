"""A stalled reader reaches the replica its sequence runs on: `ClientStream` marks the reader
stalled when a write waits past `timeouts.reader_slow_s` and unmarks it when the write goes
through; each attempt (disaggregated and colocated) tells its decode replica the state when it
is placed there and every change until it ends, and nothing after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest

from pdserve.messages import ColocatedEvent, DecodeEvent, PrefillEvent, SamplingParams
from pdserve.metrics import RouterMetrics
from router.attempt import Attempt
from router.choices import ChoiceChunk
from router.client_stream import ClientStream, OpenStreams, StreamEnd
from router.colocated_attempt import ColocatedAttempt
from router.reader_pace import ReaderPace
from router.request_flow import StreamChunk
from router.validation import ValidatedRequest
from router.wait_queue import WaitQueue
from tests.factories.config import make_config
from tests.factories.waiting import until
from tests.unit.fake_replicas import FakeActor, make_pool, use_fake_streams
from tests.unit.test_client_stream import Client, _completion

CONFIG = make_config("unused", timeouts={"client_stall_s": 5.0, "reader_slow_s": 0.05})
FIRST = PrefillEvent(kind="first_token", token_id=40, queue_s=0.5, prefill_s=0.25)
TRANSFERRED = PrefillEvent(kind="transferred", transport="grpc", num_bytes=64, transfer_s=0.1)


@pytest.fixture(autouse=True)
def fake_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_streams(monkeypatch)


def request() -> ValidatedRequest:
    return ValidatedRequest([5, 6, 7], SamplingParams(max_tokens=8), [], None)


async def chunks(num_tokens: int) -> AsyncGenerator[ChoiceChunk, None]:
    for position in range(num_tokens):
        yield ChoiceChunk(0, StreamChunk([position], f"t{position} "))
    yield ChoiceChunk(0, StreamChunk([], "", _completion("r")))


async def test_a_write_waiting_past_reader_slow_s_marks_the_reader_until_it_goes_through() -> None:
    client = Client()
    stream = ClientStream(request(), "req1", "grpc", CONFIG, RouterMetrics(), OpenStreams())
    changes: list[bool] = []
    stream.reader.watch(changes.append)
    sending = asyncio.create_task(stream.send(chunks(3), client.write))
    await until(lambda: stream.reader.stalled)
    assert client.written == [] and changes == [True]
    client.reading.set()
    assert await asyncio.wait_for(sending, 5) is StreamEnd.FINISHED
    assert not stream.reader.stalled and changes == [True, False]
    assert len(client.written) == 4


async def test_a_client_that_keeps_up_is_never_marked() -> None:
    client = Client()
    client.reading.set()
    stream = ClientStream(request(), "req1", "grpc", CONFIG, RouterMetrics(), OpenStreams())
    changes: list[bool] = []
    stream.reader.watch(changes.append)
    assert await stream.send(chunks(20), client.write) is StreamEnd.FINISHED
    assert changes == []


async def test_the_decode_replica_hears_the_state_at_placement_and_each_change() -> None:
    prefill, decode = FakeActor("prefill-0", "prefill"), FakeActor("decode-0", "decode")
    prefill.prefill.scripts = [[FIRST, TRANSFERRED]]
    decode.generate.scripts = [[DecodeEvent(token_ids=[41]), DecodeEvent(token_ids=[42])]]
    reader = ReaderPace()
    reader.set_stalled(True)  # stalled before this attempt was placed (after a preemption)
    attempt = Attempt(
        CONFIG, (await make_pool("prefill", [prefill]), await make_pool("decode", [decode])),
        [0], request(), [], "req-1", time.time() + 60, RouterMetrics(), admitted_at=1.0,
        wait_queue=WaitQueue(4, 60.0), reader=reader,
    )
    tokens = attempt.tokens()
    assert (await tokens.__anext__()).token_ids == [40]
    assert decode.reader_marks == [(attempt.transfer_id, True)]
    reader.set_stalled(False)
    assert decode.reader_marks[-1] == (attempt.transfer_id, False)
    await tokens.aclose()
    attempt.close()
    reader.set_stalled(True)  # after the attempt ended: nobody is told
    assert len(decode.reader_marks) == 2 and prefill.reader_marks == []


async def test_a_colocated_replica_hears_changes_once_the_request_is_placed() -> None:
    replica = FakeActor("colocated-0", "colocated")
    replica.generate.scripts = [[
        ColocatedEvent(token_ids=[40]), ColocatedEvent(token_ids=[41]),
        ColocatedEvent(token_ids=[42], finish_reason="length"),
    ]]
    reader = ReaderPace()
    attempt = ColocatedAttempt(
        CONFIG, await make_pool("colocated", [replica]), [0], request(), [], "req-1",
        time.time() + 60, RouterMetrics(), admitted_at=1.0, wait_queue=WaitQueue(4, 60.0),
        reader=reader,
    )
    tokens = attempt.tokens()
    await tokens.__anext__()
    assert replica.reader_marks == [], "a reader that reads is not announced"
    reader.set_stalled(True)
    assert replica.reader_marks == [(attempt.transfer_id, True)]
    events = [event async for event in tokens]
    attempt.close()
    assert events[-1].finish_reason == "length"
    reader.set_stalled(False)
    assert len(replica.reader_marks) == 1
