"""`pdserve generate --chat` and the client's chat prompts, logprobs and new sampling fields,
against the in-process fake Generation server of test_cli."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from pdserve import cli
from pdserve.client import GenerationClient, GenerationResult, collect, make_request
from tests.unit.test_cli import FakeGeneration, chat_roles, final_info, serving


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeGeneration]]:
    servicer = FakeGeneration()
    with serving(servicer) as address:
        yield address, servicer


def test_generate_chat_sends_one_user_message(fake, capsys) -> None:
    address, servicer = fake
    assert cli.main(["generate", "--address", address, "--chat", "the prompt"]) == 0
    assert chat_roles(servicer.requests[0]) == [("user", "the prompt")]
    assert not servicer.requests[0].messages.HasField("chat_template_kwargs")
    out, err = capsys.readouterr()
    assert out == "Hello, world\n"
    assert "finish=LENGTH" in err and "cached_prompt_tokens" not in err


def test_generate_system_message_comes_first_and_implies_chat(fake, capsys) -> None:
    address, servicer = fake
    argv = ["generate", "--address", address, "--system", "Be brief.", "--max-tokens", "5", "hi"]
    assert cli.main(argv) == 0
    (request,) = servicer.requests
    assert chat_roles(request) == [("system", "Be brief."), ("user", "hi")]
    assert request.sampling.max_tokens == 5


def test_make_request_prompt_forms() -> None:
    assert make_request("text", max_tokens=1).text == "text"
    assert list(make_request((4, 5), max_tokens=1).token_ids.ids) == [4, 5]
    empty = make_request([], max_tokens=1)  # the server names prompt.token_ids
    assert empty.WhichOneof("prompt") == "token_ids" and not empty.token_ids.ids
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi", "name": "ann"},
    ]
    request = make_request(
        conversation, max_tokens=1, chat_template_kwargs={"enable_thinking": False}
    )
    assert chat_roles(request) == [("system", "Be brief."), ("user", "hi")]
    assert [message.name for message in request.messages.messages] == ["", "ann"]
    kwargs = request.messages.chat_template_kwargs
    assert kwargs.fields["enable_thinking"].bool_value is False


@pytest.mark.parametrize(
    ("prompt", "kwargs", "error"),
    [
        ([{"role": "user"}], None, "prompt[0]: a chat message"),
        ([{"role": "user", "content": "x"}, 7], None, "prompt[1]: a chat message"),
        ([{"role": "user", "content": "x", "tool_calls": []}], None, "tool_calls"),
        ("text", {"enable_thinking": False}, "chat_template_kwargs"),
        ([1, 2], {}, "chat_template_kwargs"),
    ],
)
def test_make_request_refuses_malformed_chat(prompt, kwargs, error) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        make_request(prompt, max_tokens=1, chat_template_kwargs=kwargs)


def test_make_request_new_sampling_fields() -> None:
    defaults = make_request("x", max_tokens=4).sampling
    assert (defaults.min_tokens, defaults.logprobs, defaults.top_logprobs) == (0, False, 0)
    sampling = make_request("x", max_tokens=4, min_tokens=2, logprobs=True, top_logprobs=5).sampling
    assert (sampling.min_tokens, sampling.logprobs, sampling.top_logprobs) == (2, True, 5)


def test_client_chat_prompt_collects_logprobs(fake) -> None:
    address, servicer = fake
    with GenerationClient(address, timeout_s=30) as client:
        stream = client.generate(
            [{"role": "user", "content": "hi"}],
            max_tokens=4,
            min_tokens=1,
            logprobs=True,
            top_logprobs=2,
            chat_template_kwargs={"style": "short"},
        )
        result = collect(stream)
    request = servicer.requests[0]
    assert chat_roles(request) == [("user", "hi")]
    assert request.messages.chat_template_kwargs.fields["style"].string_value == "short"
    assert (request.sampling.min_tokens, request.sampling.top_logprobs) == (1, 2)
    assert [entry.token_id for entry in result.logprobs] == result.token_ids == [17, 18, 19, 20]
    assert result.logprobs[0].logprob == pytest.approx(-0.5)


def test_summary_shows_cached_prompt_tokens_when_any() -> None:
    final = final_info(10)
    assert "cached_prompt_tokens" not in GenerationResult(final=final).summary()
    final.usage.cached_prompt_tokens = 8
    summary = GenerationResult(final=final).summary()
    assert "prompt_tokens=10 cached_prompt_tokens=8 completion_tokens=4" in summary
