"""The backend flags of `pdserve bench serve`: parsing, defaults, validation, the canonical
command line, and keeping the API key out of reports."""

from __future__ import annotations

import json

import pytest

from pdserve import cli
from pdserve.bench import BenchOptions, options_from_args, options_to_argv
from pdserve.errors import InvalidArgument

URL = "http://127.0.0.1:8000/v1"
CHAT = ["--backend", "openai-chat", "--base-url", URL]
COMPLETIONS = ["--backend", "openai-completions", "--base-url", URL]


def _parse(*flags: str, token: str | None = None) -> BenchOptions:
    args = cli.build_parser().parse_args(["bench", "serve", "--concurrency", "2", *flags])
    return options_from_args(args, token=token)


def test_grpc_stays_the_default() -> None:
    options = _parse("--address", "h:1")
    assert options.backend == "grpc" and options.address == "h:1"
    assert options.base_url is None and options.send_ignore_eos
    assert options_to_argv(options)[3:5] == ["--address", "h:1"]


def test_openai_flags_build_options_and_round_trip() -> None:
    options = _parse(
        *CHAT, "--model", "m", "--tokenizer", "t.json", "--no-ignore-eos-param",
        "--prompt-len", "fixed:8",
    )  # fmt: skip
    assert (options.backend, options.base_url, options.model) == ("openai-chat", URL, "m")
    assert options.tokenizer == "t.json" and not options.send_ignore_eos
    assert options.address == ""  # --address is the grpc backend's
    argv = options_to_argv(options)
    assert argv[3:7] == ["--backend", "openai-chat", "--base-url", URL]
    assert _parse(*argv[3:]) == options


def test_the_api_key_goes_before_the_token_and_stays_out_of_reports() -> None:
    options = _parse(*COMPLETIONS, "--api-key", "sk-secret", token="pdserve-secret")
    assert options.bearer_token == "sk-secret"
    for secret in ("sk-secret", "pdserve-secret"):
        assert secret not in repr(options)
        assert secret not in json.dumps(options.to_dict())
        assert secret not in " ".join(options_to_argv(options))
    assert options.to_dict()["api_key"] == "<set>"
    assert _parse(*COMPLETIONS, token="t").bearer_token == "t"


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--backend", "openai-completions"], "--base-url"),
        (["--backend", "openai-chat", "--sharegpt", "x.json"], "--base-url"),
        (["--backend", "openai-completions", "--base-url", "127.0.0.1:8000"], "--base-url"),
        (["--base-url", URL], "--base-url"),
        (["--model", "m"], "--model"),
        (["--api-key", "k"], "--api-key"),
        (["--no-ignore-eos-param"], "--no-ignore-eos-param"),
        (["--tokenizer", "t.json"], "--tokenizer"),
        ([*COMPLETIONS, "--tokenizer", "t.json"], "--tokenizer"),
        (CHAT, "--tokenizer"),  # the synthetic prompts are token ids
        ([*CHAT, "--sharegpt", "x.json", "--mix"], "--tokenizer"),  # so are the long prompts
    ],
)
def test_contradictions_name_the_flag(flags: list[str], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _parse(*flags)
    assert info.value.field == field


def test_chat_takes_sharegpt_text_without_a_tokenizer() -> None:
    options = _parse(*CHAT, "--sharegpt", "x.json")
    assert options.backend == "openai-chat" and not options.has_token_prompts


def test_an_unknown_backend_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse("--backend", "smoke-signals")
    assert exit_info.value.code == 2


def test_grpc_options_need_an_address() -> None:
    with pytest.raises(InvalidArgument) as info:
        BenchOptions(concurrency=1)
    assert info.value.field == "--address"
