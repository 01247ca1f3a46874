"""The gRPC API's share of queueing and preemption, over loopback with a scripted flow: the
request's `priority` and an unset `sampling` / `max_tokens` 0 reach validation as priority and
"as many as fit"; `ServedBy.num_preemptions` and `Info.num_queued_requests` report them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from pdserve.client import make_request
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from router.front_door import FrontDoor
from router.replica_pool import ReplicaPool
from router.servicer import GenerationServicer
from router.wait_queue import router_queue
from tests.factories.config import make_config
from tests.factories.fake_flow import ScriptedFlow, router_tokenizer

CONFIG = make_config(
    "unused", router={"max_inflight_requests": 1}, limits={"max_tokens": 16}
)


@dataclass
class Running:
    stub: pdserve_pb2_grpc.GenerationStub
    flow: ScriptedFlow
    door: FrontDoor
    hold: asyncio.Event


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    tokenizer = router_tokenizer()
    hold = asyncio.Event()
    flow = ScriptedFlow(
        tokenizer, hold_after_first=hold, wait_queue=router_queue(CONFIG), num_preemptions=2
    )
    door = FrontDoor(CONFIG, tokenizer, flow)  # type: ignore[arg-type]
    pools = ReplicaPool("prefill", 1.0, 1.0), ReplicaPool("decode", 1.0, 1.0)
    servicer = GenerationServicer(CONFIG, door, *pools, model_name="tiny", version="9")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(pdserve_pb2_grpc.GenerationStub(channel), flow, door, hold)
    finally:
        hold.set()
        await server.stop(None)


async def generate(stub: pdserve_pb2_grpc.GenerationStub, request: pdserve_pb2.GenerateRequest
                   ) -> list[pdserve_pb2.GenerateResponse]:
    return [response async for response in stub.Generate(request, timeout=30)]


async def test_priority_and_unset_max_tokens_reach_validation(running: Running) -> None:
    running.hold.set()
    await generate(running.stub, pdserve_pb2.GenerateRequest(text="Hi", priority=-4))
    zero = pdserve_pb2.GenerateRequest(text="Hi", sampling=pdserve_pb2.SamplingParams())
    await generate(running.stub, zero)
    first, second = (run.request for run in running.flow.runs)
    assert (first.priority, second.priority) == (-4, 0)
    assert first.sampling.max_tokens == second.sampling.max_tokens == 16
    assert first.sampling.temperature == 0.0


async def test_negative_max_tokens_is_still_invalid(running: Running) -> None:
    request = pdserve_pb2.GenerateRequest(
        text="Hi", sampling=pdserve_pb2.SamplingParams(max_tokens=-1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(running.stub, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.max_tokens" in (caught.value.details() or "")


async def test_served_by_counts_preemptions_and_info_counts_the_queue(running: Running) -> None:
    holder = asyncio.create_task(generate(running.stub, pdserve_pb2.GenerateRequest(text="Hi")))
    await running.flow.first_token_sent.wait()
    queued = asyncio.create_task(generate(running.stub, pdserve_pb2.GenerateRequest(text="Yo")))
    for _ in range(500):
        if running.door.num_queued:
            break
        await asyncio.sleep(0.01)
    info = await running.stub.Info(pdserve_pb2.InfoRequest(), timeout=10)
    assert info.num_queued_requests == 1
    running.hold.set()
    for responses in await asyncio.gather(holder, queued):
        assert responses[-1].final.served_by.num_preemptions == 2
    info = await running.stub.Info(pdserve_pb2.InfoRequest(), timeout=10)
    assert info.num_queued_requests == 0


def test_the_client_sends_the_priority() -> None:
    assert make_request("Hi", max_tokens=4, priority=-2).priority == -2
    assert make_request("Hi", max_tokens=4).priority == 0
