"""The OpenAI HTTP API and gRPC chat on the real embedded model (SmolLM2-135M-Instruct, fp32),
driven by the official `openai` client: greedy chat equals `transformers` `generate()` on
`apply_chat_template(messages, add_generation_prompt=True)` token for token (alone and 8 at a
time, over HTTP and over gRPC `messages`), the rendered prompt has exactly the template's
tokens, logprobs equal `log_softmax` of transformers' logits, and streaming, n, errors and a
client that disconnects mid-stream leave nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.embedded import resolve_model_source
from pdserve.config import EMBEDDED_MODEL
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet, load_reports

pytestmark = pytest.mark.smollm2

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ],
    [{"role": "user", "content": "Traduis « bonjour » 👋 et 你好 en anglais, s'il te plaît."}],
]
MAX_TOKENS = 16
TOP_LOGPROBS = 5
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir() -> str:
    return resolve_model_source(EMBEDDED_MODEL, None)


@pytest.fixture(scope="module")
def tokenizer(model_dir: str) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(c, add_generation_prompt=True)["input_ids"]
        for c in CONVERSATIONS
    ]


@pytest.fixture(scope="module")
def reference(model_dir: str, prompts: list[list[int]]) -> dict[str, Any]:
    """Greedy continuations and, for the first conversation, the log-softmax of every step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(out[0, len(prompt):].tolist())
    full = torch.tensor([prompts[0] + outputs[0]])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompts[0]) - 1 : -1].float()
    return {"outputs": outputs, "log_softmax": torch.log_softmax(logits, dim=-1)}


@pytest.fixture(scope="module")
def service(ray_cluster: None, model_dir: str) -> Iterator[Service]:
    config = make_config(EMBEDDED_MODEL, decode={"kv_cache": {"memory_mb": 128}})
    with Service(config) as running:
        yield running


def _client(service: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=service.http_base_url, api_key="none", max_retries=0)


async def _chat(service: Service, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    return await _client(service).chat.completions.create(
        model=service.config.model.served_name, messages=messages, max_tokens=MAX_TOKENS,
        temperature=0, **kwargs,
    )


def _token_texts(tokenizer: Any, token_ids: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in token_ids]


async def test_each_chat_alone_matches_transformers_over_http(
    service: Service, tokenizer: Any, prompts: list[list[int]], reference: dict[str, Any]
) -> None:
    for messages, prompt, expected in zip(CONVERSATIONS, prompts, reference["outputs"]):
        reply = await _chat(service, messages, logprobs=True)
        choice = reply.choices[0]
        assert [entry.token for entry in choice.logprobs.content] == _token_texts(
            tokenizer, expected
        ), messages
        assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.usage.completion_tokens == len(expected)
    assert_quiet(service)


async def test_eight_concurrent_chats_match_transformers(
    service: Service, tokenizer: Any, reference: dict[str, Any]
) -> None:
    conversations = CONVERSATIONS * 2
    replies = await asyncio.gather(*(_chat(service, c, logprobs=True) for c in conversations))
    for reply, expected in zip(replies, reference["outputs"] * 2):
        tokens = [entry.token for entry in reply.choices[0].logprobs.content]
        assert tokens == _token_texts(tokenizer, expected)
    assert_quiet(service)


def test_grpc_messages_match_transformers_token_for_token(
    service: Service, prompts: list[list[int]], reference: dict[str, Any]
) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        for messages, prompt, expected in zip(CONVERSATIONS, prompts, reference["outputs"]):
            request = pdserve_pb2.GenerateRequest(
                messages=pdserve_pb2.ChatMessages(
                    messages=[pdserve_pb2.ChatMessage(**m) for m in messages]
                ),
                sampling=pdserve_pb2.SamplingParams(max_tokens=MAX_TOKENS),
            )
            responses = list(stub.Generate(request, timeout=120))
            token_ids = [t for r in responses for t in r.token_ids]
            assert token_ids == expected, messages
            assert responses[-1].final.usage.prompt_tokens == len(prompt)
    assert_quiet(service)


def test_grpc_logprobs_equal_transformers_log_softmax(
    service: Service, reference: dict[str, Any]
) -> None:
    expected = reference["outputs"][0]
    log_softmax = reference["log_softmax"]
    request = pdserve_pb2.GenerateRequest(
        messages=pdserve_pb2.ChatMessages(
            messages=[pdserve_pb2.ChatMessage(**m) for m in CONVERSATIONS[0]]
        ),
        sampling=pdserve_pb2.SamplingParams(
            max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=TOP_LOGPROBS
        ),
    )
    with grpc.insecure_channel(service.address) as channel:
        responses = list(pdserve_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120))
    entries = [entry for r in responses for entry in r.logprobs]
    assert [entry.token_id for entry in entries] == expected
    for step, entry in enumerate(entries):
        row = log_softmax[step]
        assert abs(entry.logprob - row[entry.token_id].item()) < LOGPROB_TOLERANCE
        top_values, top_ids = torch.topk(row, TOP_LOGPROBS)
        assert [alt.token_id for alt in entry.top] == top_ids.tolist(), step
        for alt, value in zip(entry.top, top_values.tolist()):
            assert abs(alt.logprob - value) < LOGPROB_TOLERANCE


async def test_http_logprobs_equal_transformers_log_softmax(
    service: Service, tokenizer: Any, reference: dict[str, Any]
) -> None:
    reply = await _chat(service, CONVERSATIONS[0], logprobs=True, top_logprobs=TOP_LOGPROBS)
    log_softmax = reference["log_softmax"]
    for step, (entry, token_id) in enumerate(
        zip(reply.choices[0].logprobs.content, reference["outputs"][0])
    ):
        assert abs(entry.logprob - log_softmax[step][token_id].item()) < LOGPROB_TOLERANCE
        top_values, top_ids = torch.topk(log_softmax[step], TOP_LOGPROBS)
        top_texts = _token_texts(tokenizer, top_ids.tolist())
        assert [alt.token for alt in entry.top_logprobs] == top_texts
        assert all(abs(alt.logprob - v) < LOGPROB_TOLERANCE
                   for alt, v in zip(entry.top_logprobs, top_values.tolist()))


async def test_stream_with_usage_equals_the_whole_response(
    service: Service, tokenizer: Any, reference: dict[str, Any]
) -> None:
    stream = await _chat(
        service, CONVERSATIONS[1], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(reference["outputs"][1], skip_special_tokens=True)
    assert chunks[-1].usage.completion_tokens == len(reference["outputs"][1])
    assert_quiet(service)


async def test_completions_endpoint_text_prompt(service: Service, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_source(EMBEDDED_MODEL, None), dtype=torch.float32
    )
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(input_ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    reply = await _client(service).completions.create(
        model=service.config.model.served_name, prompt=prompt, max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert reply.choices[0].text == expected


def _cached_prompt_tokens(service: Service) -> int:
    return sum(r.total_cached_prompt_tokens for r in load_reports(service) if r.role == "prefill")


async def test_sampled_n_choices_share_the_prompt_prefix_and_repeat_with_a_seed(
    service: Service, tokenizer: Any
) -> None:
    # A system prompt no other test sends: nothing of this prompt is cached before.
    messages = [
        {"role": "system", "content": "Zebra-striped answers only, please."},
        {"role": "user", "content": "Name three colours, one word each."},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    # The cache serves whole blocks and always leaves the last prompt token to compute.
    full_blocks_tokens = (len(prompt) - 1) // 16 * 16
    assert full_blocks_tokens >= 16, "the prompt must fill a KV block"
    kwargs: dict[str, Any] = {"n": 2, "seed": 11, "temperature": 0.9, "max_tokens": 12}
    cached_before = _cached_prompt_tokens(service)
    first = await _client(service).chat.completions.create(
        model=service.config.model.served_name, messages=messages, **kwargs
    )
    # Choice 1 started once choice 0 had its first token: it found the prompt's blocks cached.
    assert _cached_prompt_tokens(service) - cached_before == full_blocks_tokens
    again = await _client(service).chat.completions.create(
        model=service.config.model.served_name, messages=messages, **kwargs
    )
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert_quiet(service)


async def test_prompt_over_the_context_is_400_naming_messages(service: Service) -> None:
    long_question = "Tell me more. " * 400  # well past max_context_tokens (512 in tests)
    with pytest.raises(openai.BadRequestError) as info:
        await _chat(service, [{"role": "user", "content": long_question}])
    assert info.value.param == "messages"
    assert_quiet(service)


def _decoded_tokens(service: Service) -> int:
    return sum(r.total_decode_tokens for r in load_reports(service) if r.role == "decode")


async def test_client_disconnect_mid_stream_frees_everything(service: Service) -> None:
    decoded_before = _decoded_tokens(service)
    body = {
        "model": service.config.model.served_name, "messages": CONVERSATIONS[0],
        "max_tokens": 120, "ignore_eos": True, "stream": True, "n": 2,
    }
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{service.http_base_url}/chat/completions", json=body)
        assert response.status == 200
        received = 0
        while received < 4:  # a few content events of the running stream
            line = await response.content.readline()
            received += line.startswith(b"data: ")
        response.close()
    assert_quiet(service)
    # Both choices were cut short: far fewer steps ran than 2 x 120 tokens would need.
    assert _decoded_tokens(service) - decoded_before < 120
