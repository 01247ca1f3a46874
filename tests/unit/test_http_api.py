"""The OpenAI HTTP API over real HTTP on loopback, driven by the official `openai` client, with a
scripted request flow behind the real front door (no Ray): shapes, streaming, n, logprobs,
errors as the client's own exception classes, auth, disconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from pdserve.errors import ResourceExhausted, Unavailable
from tests.factories.config import make_config
from tests.factories.fake_flow import router_tokenizer
from tests.factories.http_api import MODEL, Api, start_api

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    config = make_config("unused", model={"served_model_name": MODEL}, limits={"max_n": 3})
    running = await start_api(config)
    yield running
    await running.server.stop()


async def test_priority_extension_reaches_the_flow_on_both_endpoints(api: Api) -> None:
    client = api.client()
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        extra_body={"priority": -3},
    )
    await client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=4, extra_body={"priority": 7}
    )
    await client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert [run.request.priority for run in api.flow.runs] == [-3, 7, 0]
    for bad in (2**40, "high", True):
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(
                model=MODEL, prompt="Hi", max_tokens=4, extra_body={"priority": bad}
            )
        assert info.value.param == "priority", bad
    assert len(api.flow.runs) == 3


async def test_chat_completion_whole_response(api: Api) -> None:
    reply = await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=64,
        temperature=0,
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == api.flow.reply_text
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    (run,) = api.flow.runs
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert run.request.prompt_text == rendered
    assert run.request.prompt_token_ids == api.door.tokenizer.encode(
        rendered, add_special_tokens=False
    )
    assert run.request.sampling.temperature == 0
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens == run.request.num_prompt_tokens
    assert usage.completion_tokens == len(
        api.door.tokenizer.encode(api.flow.reply_text, add_special_tokens=False)
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 3
    extra = choice.model_extra["pdserve"]
    assert extra["request_id"] == run.request_id
    assert extra["served_by"]["kv_transport"] == "grpc"
    assert extra["served_by"]["num_preemptions"] == 0


async def test_openai_defaults_and_max_tokens_unset(api: Api) -> None:
    await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}]
    )
    sampling = api.flow.runs[0].request.sampling
    assert sampling.temperature == 1.0 and sampling.top_p == 1.0
    prompt = api.flow.runs[0].request.num_prompt_tokens
    assert sampling.max_tokens == min(128, api.door.max_context_tokens - prompt)


async def test_chat_stream_role_content_finish_usage_done(api: Api) -> None:
    stream = await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == api.flow.reply_text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


async def test_raw_stream_ends_with_done_and_sends_request_id(api: Api) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
            "max_tokens": 4}
    async with aiohttp.ClientSession() as session, session.post(
        f"{api.base_url}/v1/chat/completions", json=body
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    events = [line for line in raw.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert response.headers["x-request-id"] == api.flow.runs[0].request_id


async def test_completions_text_and_token_prompts(api: Api) -> None:
    client = api.client()
    reply = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].finish_reason == "length"
    assert api.flow.runs[0].request.prompt_token_ids == api.door.tokenizer.encode("Hello")
    await client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5)
    assert api.flow.runs[1].request.prompt_token_ids == [5, 6, 7]
    stream = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=64, stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == api.flow.reply_text


async def test_n_choices_are_independent_and_seeded_apart(api: Api) -> None:
    reply = await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, seed=7, max_tokens=64,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content == api.flow.reply_text for c in reply.choices)
    seeds = sorted(run.request.sampling.seed for run in api.flow.runs)
    assert seeds == [7, 8]
    ids = {run.request_id for run in api.flow.runs}
    assert len(ids) == 2 and all(rid.rsplit("-", 1)[0] == reply.id[len("chatcmpl-"):]
                                 for rid in ids)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2 * len(
        api.door.tokenizer.encode(api.flow.reply_text, add_special_tokens=False)
    )


async def test_streamed_n_choices_each_finish(api: Api) -> None:
    stream = await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=64,
        stream=True,
    )
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert set(texts.values()) == {api.flow.reply_text}


async def test_chat_logprobs(api: Api) -> None:
    reply = await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        logprobs=True, top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    token_ids = api.door.tokenizer.encode(api.flow.reply_text, add_special_tokens=False)[:3]
    assert [entry.token for entry in content] == [
        api.door.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids
    ]
    assert all(entry.logprob == -0.25 and len(entry.top_logprobs) == 2 for entry in content)
    assert content[0].bytes == list(content[0].token.encode())
    sampling = api.flow.runs[0].request.sampling
    assert sampling.logprobs and sampling.top_logprobs == 2


async def test_completion_logprobs_legacy_shape(api: Api) -> None:
    reply = await api.client().completions.create(
        model=MODEL, prompt="Hi", max_tokens=3, logprobs=1
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == 3
    assert logprobs.token_logprobs == [-0.25] * 3
    assert logprobs.text_offset[0] == 0
    assert all(len(top) == 1 for top in logprobs.top_logprobs)


async def test_models_health_version(api: Api) -> None:
    models = await api.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    model = await api.client().models.retrieve(MODEL)
    assert model.id == MODEL
    with pytest.raises(openai.NotFoundError):
        await api.client().models.retrieve("other")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{api.base_url}/health") as response:
            assert response.status == 200
        async with session.get(f"{api.base_url}/version") as response:
            assert (await response.json()) == {"version": "9.9.9"}
        async with session.get(f"{api.base_url}/nowhere") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 4}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": ["x"] * 20}, "stop"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ],
)
async def test_bad_chat_arguments_are_400_naming_the_param(
    api: Api, arguments: dict[str, Any], param: str
) -> None:
    request: dict[str, Any] = {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **arguments
    }
    # Parameters the OpenAI client does not know (vLLM's extensions) travel in extra_body.
    extensions = {key: request.pop(key) for key in ("min_tokens", "top_k") if key in request}
    with pytest.raises(openai.BadRequestError) as info:
        await api.client().chat.completions.create(**request, extra_body=extensions)
    assert info.value.status_code == 400
    assert info.value.param == param, info.value.body
    assert info.value.message and param in info.value.message
    assert not api.flow.runs


async def test_unknown_argument_and_unknown_model(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await api.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}],
            extra_body={"frobnicate": 1},
        )
    assert info.value.param == "frobnicate"
    with pytest.raises(openai.NotFoundError) as not_found:
        await api.client().chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "Hi"}]
        )
    assert not_found.value.param == "model" and not_found.value.code == "model_not_found"


async def test_body_limit_json_and_utf8(api: Api) -> None:
    url = f"{api.base_url}/v1/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"{" + b" " * 2_000_000 + b"}") as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "request_too_large"
        for body, problem in [
            (b"{not json", "not valid JSON"),
            (b'{"prompt": "\xff"}', "UTF-8"),
            (b'{"prompt": "\\ud800"}', "surrogate"),
            (b'{"prompt": "x", "temperature": NaN}', "not valid JSON"),
            (b"[1, 2]", "JSON object"),
        ]:
            async with session.post(url, data=body) as response:
                assert response.status == 400, body
                assert problem in (await response.json())["error"]["message"], body
    assert not api.flow.runs


async def test_resource_exhausted_is_429_and_unavailable_503() -> None:
    config = make_config("unused", model={"served_model_name": MODEL})
    busy = await start_api(config, fail_before_first=ResourceExhausted("no room"))
    try:
        with pytest.raises(openai.RateLimitError):
            await busy.client().completions.create(model=MODEL, prompt="Hi", stream=True)
        assert busy.door.num_inflight == 0
    finally:
        await busy.server.stop()
    down = await start_api(config, serving=False, fail_before_first=Unavailable("no replica"))
    try:
        with pytest.raises(openai.InternalServerError) as info:
            await down.client().completions.create(model=MODEL, prompt="Hi")
        assert info.value.status_code == 503
        async with aiohttp.ClientSession() as session, session.get(
            f"{down.base_url}/health"
        ) as response:
            assert response.status == 503
    finally:
        await down.server.stop()


async def test_error_after_the_first_token_is_a_final_sse_error_event() -> None:
    config = make_config("unused", model={"served_model_name": MODEL})
    api = await start_api(config, fail_after_tokens=2, fail_error=Unavailable("decode died"))
    try:
        stream = await api.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        received = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                received.append(chunk)
        assert "decode died" in info.value.message
        assert received, "tokens before the failure were streamed"
        assert api.door.num_inflight == 0
    finally:
        await api.server.stop()


async def test_client_disconnect_mid_stream_closes_the_flow() -> None:
    config = make_config("unused", model={"served_model_name": MODEL})
    hold = asyncio.Event()
    api = await start_api(config, hold_after_first=hold)
    try:
        body = {"model": MODEL, "prompt": "Hi", "stream": True, "n": 2}
        session = aiohttp.ClientSession()
        response = await session.post(f"{api.base_url}/v1/completions", json=body)
        assert response.status == 200
        await response.content.readline()  # the stream is open
        await api.flow.first_token_sent.wait()
        response.close()
        await session.close()
        await _until(lambda: api.door.num_inflight == 0)
        assert [run.outcome for run in api.flow.runs] == ["closed", "closed"]
    finally:
        hold.set()
        await api.server.stop()


async def test_bearer_token_required_on_v1_but_not_on_probes(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    config = make_config(
        "unused", model={"served_model_name": MODEL},
        security={"api_tokens_file": str(tokens)},
    )
    api = await start_api(config)
    try:
        with pytest.raises(openai.AuthenticationError):
            await api.client("wrong-token-0123456789").models.list()
        with pytest.raises(openai.AuthenticationError):
            await api.client("wrong-token-0123456789").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
        assert not api.flow.runs
        reply = await api.client(TOKEN).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}]
        )
        assert reply.choices[0].message.content == api.flow.reply_text
        async with aiohttp.ClientSession() as session, session.get(
            f"{api.base_url}/health"
        ) as response:
            assert response.status == 200
    finally:
        await api.server.stop()


async def test_model_without_chat_template_refuses_chat_but_serves_completions() -> None:
    config = make_config("unused", model={"served_model_name": MODEL})
    api = await start_api(config)
    api.door._tokenizer = router_tokenizer(chat_template="")  # noqa: SLF001 - the test's model
    try:
        with pytest.raises(openai.BadRequestError) as info:
            await api.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
        assert info.value.param == "messages"
        assert "chat template" in info.value.message
        reply = await api.client().completions.create(model=MODEL, prompt="Hi")
        assert reply.choices[0].text
    finally:
        await api.server.stop()


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    """Waits (bounded) for `condition`, yielding to the loop between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
