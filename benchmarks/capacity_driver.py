"""The capacity benchmark's load: C workers in a closed loop, each sending its next chat as soon
as its previous one ended, over one grpc.aio channel. Each record says how the request ended
(OK, refused with RESOURCE_EXHAUSTED, or another status) and what the client saw, with the time
of every token-carrying message, so throughput can also be read over the steady part of the run
(until the last request was sent), before the long answers' tail runs at lower concurrency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

REQUEST_TIMEOUT_S = 900.0


@dataclass
class ChatRecord:
    status: str = "PENDING"
    ttft_s: float | None = None
    # Gaps between token-carrying messages after the first.
    itl_s: list[float] = field(default_factory=list)
    num_completion_tokens: int = 0
    num_preemptions: int = 0
    # Router queue + prefill replica queue, as the final message reports it.
    queue_s: float = 0.0
    e2e_s: float = 0.0
    # Seconds since the run started at which each token-carrying message arrived, and the
    # number of tokens it carried.
    token_times_s: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)


@dataclass
class LoopRun:
    records: list[ChatRecord]
    elapsed_s: float
    # When the last request was sent: until then every worker had a request in flight.
    dispatch_done_s: float


async def closed_loop(
    address: str, questions: list[str], concurrency: int, num_requests: int, max_tokens: int
) -> LoopRun:
    """Sends `num_requests` chats from `concurrency` workers (question i goes to request i,
    cycling); returns the records and the run's timings."""
    records: list[ChatRecord] = []
    next_index = 0
    started = time.perf_counter()
    dispatch_done_s = 0.0

    async def worker(stub: pdserve_pb2_grpc.GenerationStub) -> None:
        nonlocal next_index, dispatch_done_s
        while next_index < num_requests:
            question = questions[next_index % len(questions)]
            next_index += 1
            if next_index == num_requests:
                dispatch_done_s = time.perf_counter() - started
            record = ChatRecord()
            records.append(record)
            await _one_chat(stub, question, max_tokens, record, started)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(concurrency)))
    return LoopRun(records, time.perf_counter() - started, dispatch_done_s)


async def _one_chat(
    stub: pdserve_pb2_grpc.GenerationStub,
    question: str,
    max_tokens: int,
    record: ChatRecord,
    run_started: float,
) -> None:
    request = pdserve_pb2.GenerateRequest(
        messages=pdserve_pb2.ChatMessages(
            messages=[pdserve_pb2.ChatMessage(role="user", content=question)]
        ),
        sampling=pdserve_pb2.SamplingParams(max_tokens=max_tokens),
    )
    sent_at = time.perf_counter()
    last_token_at = sent_at
    try:
        async for response in stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            now = time.perf_counter()
            if response.token_ids:
                if record.ttft_s is None:
                    record.ttft_s = now - sent_at
                else:
                    record.itl_s.append(now - last_token_at)
                last_token_at = now
                record.num_completion_tokens += len(response.token_ids)
                record.token_times_s.append(now - run_started)
                record.token_counts.append(len(response.token_ids))
            if response.HasField("final"):
                record.num_preemptions = response.final.served_by.num_preemptions
                record.queue_s = response.final.timings.queue_s
        record.status = "OK"
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
    record.e2e_s = time.perf_counter() - sent_at
