"""How a gRPC stream ends when its client or the server stops it, over loopback with a scripted
flow behind the real front door: a client that grants no flow-control window has its request
cancelled after `timeouts.client_stall_s` (a bystander is unaffected); a drain's cut ends a
running stream with a final FINISH_REASON_CANCELLED message; a client deadline that passes
mid-stream counts as DEADLINE_EXCEEDED in `pdserve_router_requests_total`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from pdserve.metrics import RouterMetrics
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from router.front_door import FrontDoor
from router.replica_pool import ReplicaPool
from router.servicer import GenerationServicer
from router.wait_queue import router_queue
from tests.factories.config import make_config
from tests.factories.fake_flow import ScriptedFlow, router_tokenizer
from tests.factories.stalled_clients import StalledGrpcCall
from tests.factories.waiting import until
from tests.unit.test_metrics import value

CONFIG = make_config(
    "unused",
    limits={"max_tokens": 48},
    timeouts={"client_stall_s": 0.5, "reader_slow_s": 0.1},
    router={"max_buffered_messages": 4},
)
REPLY = "one two three four five six seven eight nine ten " * 8
GENERATE = "/pdserve.v1.Generation/Generate"
WAIT_S = 20.0


@dataclass
class Running:
    port: int
    stub: pdserve_pb2_grpc.GenerationStub
    flow: ScriptedFlow
    door: FrontDoor
    metrics: RouterMetrics
    hold: asyncio.Event

    def count(self, name: str, **labels: str) -> float:
        return value(self.metrics.registry, name, **labels)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    tokenizer = router_tokenizer()
    hold = asyncio.Event()
    flow = ScriptedFlow(
        tokenizer, reply_text=REPLY, hold_after_first=hold, wait_queue=router_queue(CONFIG)
    )
    metrics = RouterMetrics()
    door = FrontDoor(CONFIG, tokenizer, flow, metrics)  # type: ignore[arg-type]
    pools = ReplicaPool("prefill", 1.0, 1.0), ReplicaPool("decode", 1.0, 1.0)
    servicer = GenerationServicer(
        CONFIG, door, *pools, model_name="tiny", version="9", metrics=metrics
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdserve_pb2_grpc.GenerationStub(channel)
            yield Running(port, stub, flow, door, metrics, hold)
    finally:
        hold.set()
        await server.stop(None)


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pdserve_pb2.GenerateResponse]:
    """The call's remaining messages, read with `read` (a call cannot mix it with iteration)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


def request(max_tokens: int = 40) -> pdserve_pb2.GenerateRequest:
    return pdserve_pb2.GenerateRequest(
        text="Hi", sampling=pdserve_pb2.SamplingParams(max_tokens=max_tokens)
    )


async def test_a_client_granting_no_window_is_cancelled_and_a_bystander_finishes(
    running: Running,
) -> None:
    running.hold.set()
    call = StalledGrpcCall(running.port, GENERATE, request().SerializeToString(), window=64)
    try:
        await until(lambda: len(running.flow.runs) == 1, "the stalled request to start")
        stalled_run = running.flow.runs[0]
        responses = [r async for r in running.stub.Generate(request(), timeout=WAIT_S)]
        await until(lambda: stalled_run.outcome != "running", "the stalled request's end")
    finally:
        call.close()
    # The scripted flow could not finish: the bounded buffer stopped reading it, and the stall
    # closed it (which, with real replicas, aborts its work and frees its KV).
    assert stalled_run.outcome == "closed"
    assert call.num_bytes_received <= 64
    assert running.count("pdserve_router_client_stalls_total", api="grpc") == 1
    await until(
        lambda: running.count("pdserve_router_requests_total", status="CANCELLED") == 1,
        "the stalled request to be counted",
    )
    bystander = running.flow.runs[1]
    assert bystander.outcome == "finished"
    assert "".join(r.text for r in responses) == running.door.tokenizer.decode(
        running.door.tokenizer.encode(REPLY, add_special_tokens=False)[:40]
    )
    assert responses[-1].final.finish_reason == pdserve_pb2.FINISH_REASON_LENGTH
    assert running.count("pdserve_router_requests_total", status="OK") == 1
    assert running.door.num_inflight == 0


async def test_a_drain_cut_ends_the_stream_with_a_cancelled_final_message(
    running: Running,
) -> None:
    call = running.stub.Generate(request(), timeout=WAIT_S)
    first = await call.read()
    assert list(first.token_ids) and not first.HasField("final")
    assert not await running.door.drain(grace_s=0.2)  # the held stream outlives the grace
    rest = await read_rest(call)
    assert await call.code() == grpc.StatusCode.OK
    final = rest[-1].final
    assert final.finish_reason == pdserve_pb2.FINISH_REASON_CANCELLED
    (run,) = running.flow.runs
    assert final.request_id == run.request_id != ""
    assert final.usage.prompt_tokens == run.request.num_prompt_tokens
    assert final.usage.completion_tokens == len(first.token_ids) + sum(
        len(r.token_ids) for r in rest
    )
    assert final.served_by.mode == "disaggregated"
    assert run.outcome == "closed"  # its work was aborted before the final message
    await until(
        lambda: running.count("pdserve_router_requests_total", status="CANCELLED") == 1,
        "the cut request to be counted",
    )
    assert running.door.num_inflight == 0


async def test_a_client_deadline_passing_mid_stream_counts_as_deadline_exceeded(
    running: Running,
) -> None:
    # The scripted flow holds the stream open after its first token, so the deadline passes
    # mid-stream; long enough for the first token on a loaded machine.
    call = running.stub.Generate(request(), timeout=1.0)
    await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_rest(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(
        lambda: running.count("pdserve_router_requests_total", status="DEADLINE_EXCEEDED") == 1,
        "the expired request to be counted",
    )
    assert running.flow.runs[0].outcome == "closed"
    # A client that cancels mid-stream is still CANCELLED, not an expired deadline.
    cancelled = running.stub.Generate(request(), timeout=WAIT_S)
    await cancelled.read()
    cancelled.cancel()
    await until(
        lambda: running.count("pdserve_router_requests_total", status="CANCELLED") == 1,
        "the cancelled request to be counted",
    )
    assert running.count("pdserve_router_requests_total", status="DEADLINE_EXCEEDED") == 1
