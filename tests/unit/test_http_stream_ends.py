"""How an OpenAI HTTP stream ends when its client or the server stops it, over real HTTP on
loopback with a scripted flow behind the real front door: a drain's cut ends a running stream
with a final chunk (finish reason `abort`, usage) and `[DONE]`; a client that never reads has
its request cancelled after `timeouts.client_stall_s` and its connection dropped; a stream
that fails mid-way counts as its error status in `pdserve_router_requests_total`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from pdserve.errors import Unavailable
from tests.factories.config import make_config
from tests.factories.http_api import MODEL, Api, start_api
from tests.factories.stalled_clients import unread_http_request
from tests.factories.waiting import until
from tests.unit.test_metrics import value

WAIT_S = 30.0


def count(api: Api, status: str) -> float:
    return value(api.metrics.registry, "pdserve_router_requests_total", status=status)


def events_of(raw: str) -> list[str]:
    return [event.removeprefix("data: ") for event in raw.split("\n\n") if event]


async def test_a_drain_cut_ends_the_sse_stream_with_an_abort_chunk_usage_and_done() -> None:
    config = make_config("unused", model={"served_model_name": MODEL})
    hold = asyncio.Event()
    api = await start_api(config, hold_after_first=hold)
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
        "stream": True, "stream_options": {"include_usage": True},
    }
    try:
        async with aiohttp.ClientSession() as session, session.post(
            f"{api.base_url}/v1/chat/completions", json=body
        ) as response:
            assert response.status == 200
            await asyncio.wait_for(api.flow.first_token_sent.wait(), WAIT_S)
            assert not await api.door.drain(grace_s=0.2)
            raw = (await asyncio.wait_for(response.read(), WAIT_S)).decode()
    finally:
        hold.set()
        await api.server.stop()
    events = events_of(raw)
    assert events[-1] == "[DONE]"
    chunks: list[dict[str, Any]] = [json.loads(event) for event in events[:-1]]
    (run,) = api.flow.runs
    assert run.outcome == "closed"  # its work was aborted before the final chunk
    *updates, final, usage_chunk = chunks
    (choice,) = final["choices"]
    assert choice["finish_reason"] == "abort"
    assert choice["pdserve"]["request_id"] == run.request_id
    assert all(c["finish_reason"] is None for u in updates for c in u["choices"])
    text = "".join(c["delta"].get("content", "") for u in updates for c in u["choices"])
    assert text  # the first token's text came before the cut
    usage = usage_chunk["usage"]
    assert usage["prompt_tokens"] == run.request.num_prompt_tokens
    assert usage["completion_tokens"] == 1  # the one token sent before the cut
    assert count(api, "CANCELLED") == 1 and count(api, "OK") == 0
    assert api.door.num_inflight == 0


async def test_a_client_that_never_reads_is_cancelled_and_dropped() -> None:
    # Sixteen choices of 200 tokens with 20 alternatives each: megabytes of events, more than
    # the kernel buffers of a loopback connection hold (about 2 MiB with the smallest receive
    # buffer), so the router's writes block.
    config = make_config(
        "unused", model={"served_model_name": MODEL},
        limits={"max_n": 16, "max_tokens": 200},
        timeouts={"client_stall_s": 0.5, "reader_slow_s": 0.1}, router={"max_buffered_messages": 4},
    )
    api = await start_api(config, reply_text="Hello, world! How are you today? " * 60)
    body = json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200,
        "n": 16, "logprobs": True, "top_logprobs": 20, "stream": True,
    }).encode()
    sock = unread_http_request(api.port, "/v1/chat/completions", body)
    try:
        await until(
            lambda: value(api.metrics.registry, "pdserve_router_client_stalls_total", api="http")
            == 1, "the stall",
        )
        await until(lambda: count(api, "CANCELLED") == 1, "the stalled request's end")
        assert api.door.num_inflight == 0
        assert all(run.outcome != "running" for run in api.flow.runs)
        # The router dropped the connection: the client reads what the kernel buffered, then
        # the end of the stream, without `[DONE]`.
        sock.settimeout(WAIT_S)
        received = bytearray()
        while chunk := await asyncio.to_thread(sock.recv, 1 << 20):
            received += chunk
        assert not received.endswith(b"data: [DONE]\n\n")
    finally:
        sock.close()
        await api.server.stop()


async def test_a_stream_failing_mid_way_counts_as_its_error() -> None:
    config = make_config("unused", model={"served_model_name": MODEL})
    api = await start_api(
        config, fail_after_tokens=3, fail_error=Unavailable("decode-0 failed after 3 tokens")
    )
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 16, "stream": True}
    try:
        async with aiohttp.ClientSession() as session, session.post(
            f"{api.base_url}/v1/completions", json=body
        ) as response:
            raw = (await response.read()).decode()
    finally:
        await api.server.stop()
    events = events_of(raw)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] is not None
    assert count(api, "UNAVAILABLE") == 1 and count(api, "OK") == 0
