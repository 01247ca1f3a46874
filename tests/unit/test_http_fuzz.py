"""Hypothesis-fuzzed JSON bodies against the OpenAI endpoints (real HTTP, scripted flow): the
answer is 200 or a 4xx with OpenAI's error object, never a 5xx, and nothing stays in flight."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories.config import make_config
from tests.factories.http_api import MODEL, Api, start_api

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "", "wizard"])
contents = st.one_of(
    st.text(max_size=60),
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                    "text": st.text(max_size=20)}), max_size=3),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": contents}), max_size=4
) | json_values
# Each known parameter with plausible and implausible values.
parameters = {
    "model": st.sampled_from([MODEL, "other"]) | json_values,
    "max_tokens": st.integers(-3, 300) | json_values,
    "max_completion_tokens": st.integers(-3, 300) | st.none(),
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "top_k": st.integers(-2, 100) | json_values,
    "n": st.integers(-1, 6) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "stop": st.text(max_size=8) | st.lists(st.text(max_size=80), max_size=10) | json_values,
    "seed": st.integers(-(2**65), 2**65) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 30) | json_values,
    "top_logprobs": st.integers(-1, 30) | json_values,
    "min_tokens": st.integers(-2, 20) | json_values,
    "stop_token_ids": st.lists(st.integers(-5, 1000), max_size=40) | json_values,
    "ignore_eos": st.booleans() | json_values,
    "frequency_penalty": st.sampled_from([0, 0.5]) | json_values,
    "tools": st.just([]) | json_values,
    "response_format": st.just({"type": "text"}) | json_values,
    "chat_template_kwargs": st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    "user": st.text(max_size=10) | json_values,
}
bodies = st.fixed_dictionaries(
    {"messages": messages, "prompt": st.text(max_size=50) | st.lists(st.integers(-5, 500))
     | json_values},
    optional=parameters,
)


@pytest.fixture(scope="module")
async def api() -> AsyncIterator[Api]:
    config = make_config("unused", model={"served_model_name": MODEL}, limits={"max_n": 3})
    running = await start_api(config)
    yield running
    await running.server.stop()


async def _post(api: Api, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{api.base_url}{path}", data=json.dumps(body)
    ) as response:
        raw = await response.read()
        if response.status != 200:
            return response.status, json.loads(raw)
        return 200, raw


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
async def test_fuzzed_bodies_get_200_or_an_openai_4xx(
    api: Api, body: dict[str, Any], endpoint: str
) -> None:
    if endpoint == "/v1/chat/completions":
        body.pop("prompt", None)
    else:
        body.pop("messages", None)
    status, payload = await _post(api, endpoint, body)
    assert status == 200 or 400 <= status < 500, (status, body, payload)
    if status != 200:
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
    assert api.door.num_inflight == 0
