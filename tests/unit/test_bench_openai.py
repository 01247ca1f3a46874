"""The load generator's openai-* backends against a fake OpenAI-compatible server (aiohttp.web
on 127.0.0.1, in its own thread): what is sent, token counts, TTFT and per-chunk gaps, errors,
the bearer token and model discovery."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pdserve.bench import BenchOptions, run_serve_bench
from pdserve.bench.lengths import LengthDistribution
from pdserve.bench.workload import SyntheticWorkload
from pdserve.errors import FailedPrecondition
from tests.factories.tokenizer import train_byte_level_tokenizer

MODEL = "fake-model"
CHAT_TEMPLATE_TOKENS = 5  # what the fake adds to a chat prompt's word count


class FakeOpenAI:
    """Streams `max_tokens` tokens of "x" as OpenAI does: a role chunk, single-token chunks
    and a last two-token chunk (paced a little), a finish chunk, a usage chunk, [DONE].
    `mode` "429" refuses with a JSON error; "error_event" fails after two content chunks."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.send_usage = True
        self.models: list[dict[str, Any]] = [{"id": MODEL, "max_model_len": 4096}, {"id": "b"}]
        self.posts: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.num_model_lookups = 0
        self.client_ports: set[int] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        self.num_model_lookups += 1
        return web.json_response({"object": "list", "data": self.models})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.posts.append((request.path, dict(request.headers), body))
        self.client_ports.add(request.transport.get_extra_info("peername")[1])
        if self.mode == "429":
            error = {"message": "Rate limit reached", "type": "rate_limit_error", "code": None}
            return web.json_response({"error": error}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chat = request.path.endswith("/chat/completions")
        num_tokens = body["max_tokens"]
        await _send(response, _chunk(chat, {"role": "assistant", "content": ""}))
        sizes = [1] * (num_tokens - 2) + [2] if num_tokens >= 3 else [1] * num_tokens
        for index, size in enumerate(sizes):
            if self.mode == "error_event" and index == 2:
                error = {"message": "decode replica lost", "type": "server_error", "code": 500}
                await response.write(b"event: error\n")
                await _send(response, {"error": error})
                return response
            await asyncio.sleep(0.002)  # pacing only: makes the gaps measurable
            await _send(response, _chunk(chat, {"content": "x" * size}))
        await _send(response, _chunk(chat, {}, finish_reason="length"))
        if self.send_usage:
            usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": num_tokens}
            await _send(response, {"id": "cmpl-1", "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response


def _chunk(chat: bool, delta: dict[str, str], finish_reason: str | None = None) -> dict:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None}
    choice["finish_reason"] = finish_reason
    return {"id": "cmpl-1", "object": "chunk", "model": MODEL, "choices": [choice]}


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return len(body["messages"][0]["content"].split()) + CHAT_TEMPLATE_TOKENS
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


async def _send(response: web.StreamResponse, chunk: dict) -> None:
    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeOpenAI]]:
    server = FakeOpenAI()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(server.app())

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner.addresses[0][1]

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield f"http://127.0.0.1:{port}/v1", server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


def _options(base_url: str, **overrides: Any) -> BenchOptions:
    values: dict[str, Any] = {
        "backend": "openai-completions",
        "base_url": base_url,
        "concurrency": 2,
        "num_requests": 4,
        "prompt_len": LengthDistribution.parse("uniform:4:20"),
        "output_len": LengthDistribution.parse("fixed:6"),
        "vocab_low": 10,
        "vocab_high": 300,
        "seed": 3,
        "progress": False,
        "out_dir": None,
    }
    values.update(overrides)
    return BenchOptions(**values)


def test_no_keep_alive_opens_a_connection_per_request(fake) -> None:
    base_url, server = fake
    run_serve_bench(_options(base_url, keep_alive=False))
    # Each of the 4 requests on its own connection (2 would do with keep-alive).
    assert len(server.posts) == 4 and len(server.client_ports) == 4


def test_completions_record_usage_counts_ttft_and_chunk_gaps(fake, tmp_path: Path) -> None:
    base_url, server = fake
    results = run_serve_bench(_options(base_url, out_dir=str(tmp_path)))

    assert server.num_model_lookups == 1
    assert len(server.posts) == 4
    assert len(server.client_ports) <= 2  # one kept-alive connection per concurrent stream
    for path, headers, body in server.posts:
        assert path == "/v1/completions" and "Authorization" not in headers
        assert body["model"] == MODEL and body["max_tokens"] == 6 and body["temperature"] == 0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True
        assert all(isinstance(token_id, int) for token_id in body["prompt"])
    prompt_lengths = sorted(len(body["prompt"]) for _, _, body in server.posts)
    assert sorted(r["num_prompt_tokens"] for r in results["requests"]) == prompt_lengths
    for record in results["requests"]:
        assert record["status"] == "OK" and record["finish_reason"] == "length"
        assert record["num_completion_tokens"] == 6 and record["num_tokens_source"] == "usage"
        # 6 tokens in 5 content chunks (the role chunk carries none): 4 gaps between chunks.
        assert record["message_unit"] == "chunks" and record["message_num_tokens"] == [1] * 5
        offsets = record["message_offsets_s"]
        assert 0 < record["ttft_s"] == offsets[0] <= record["e2e_s"]
        assert len(record["itl_s"]) == 4 and all(gap > 0 for gap in record["itl_s"])
        assert record["tpot_s"] == pytest.approx((offsets[-1] - offsets[0]) / 5, abs=1e-5)
        assert record["request_id"] == "cmpl-1"
    assert results["summary"]["num_output_tokens"] == 24
    assert results["target"]["backend"] == "openai-completions"
    assert results["target"]["url"] == base_url and results["target"]["model"] == MODEL
    assert results["target"]["ignore_eos_sent"] is True
    assert results["server"]["max_context_tokens"] == 4096
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["target"] == results["target"] and "cpu_count" in written["machine"]
    assert (tmp_path / "latency_cdf.png").exists() and (tmp_path / "itl_over_time.png").exists()


def test_the_bearer_header_and_a_given_model(fake) -> None:
    base_url, server = fake
    run_serve_bench(_options(base_url, num_requests=2, model="mine", token="pdserve-token"))
    assert server.num_model_lookups == 0  # --model given: no discovery
    assert {body["model"] for _, _, body in server.posts} == {"mine"}
    assert {headers["Authorization"] for _, headers, _ in server.posts} == {"Bearer pdserve-token"}

    server.posts.clear()
    run_serve_bench(_options(base_url, num_requests=1, api_key="sk-1", token="pdserve-token"))
    assert server.posts[0][1]["Authorization"] == "Bearer sk-1"  # the API key wins


def test_ignore_eos_is_left_out_on_request(fake) -> None:
    base_url, server = fake
    results = run_serve_bench(_options(base_url, num_requests=2, send_ignore_eos=False))
    assert all("ignore_eos" not in body for _, _, body in server.posts)
    assert results["target"]["ignore_eos_sent"] is False
    assert "--no-ignore-eos-param" in results["command_line"]


def test_without_usage_the_chunks_are_counted(fake) -> None:
    base_url, server = fake
    server.send_usage = False
    results = run_serve_bench(_options(base_url, num_requests=2))
    for record in results["requests"]:
        assert record["status"] == "OK" and record["num_tokens_source"] == "counted"
        assert record["num_completion_tokens"] == 5  # chunks, not the 6 tokens they carried


def test_http_errors_are_recorded_with_status_and_message(fake) -> None:
    base_url, server = fake
    server.mode = "429"
    results = run_serve_bench(_options(base_url, num_requests=3))
    assert [r["status"] for r in results["requests"]] == ["HTTP_429"] * 3
    assert {r["error"] for r in results["requests"]} == {"Rate limit reached"}
    assert {r["message_unit"] for r in results["requests"]} == {"chunks"}
    assert results["summary"]["failures"]["HTTP_429"]["count"] == 3
    assert results["summary"]["num_ok"] == 0


def test_an_error_event_mid_stream_fails_the_request(fake) -> None:
    base_url, server = fake
    server.mode = "error_event"
    results = run_serve_bench(_options(base_url, num_requests=2))
    for record in results["requests"]:
        assert record["status"] == "HTTP_500" and record["error"] == "decode replica lost"
        assert len(record["message_offsets_s"]) == 2  # the chunks before the error
    assert results["summary"]["failures"]["HTTP_500"]["count"] == 2


def test_chat_decodes_token_prompts_with_the_tokenizer(fake, tmp_path: Path) -> None:
    base_url, server = fake
    tokenizer = train_byte_level_tokenizer()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    options = _options(
        base_url, backend="openai-chat", tokenizer=str(tmp_path), concurrency=1, num_requests=3
    )
    results = run_serve_bench(options)

    shapes = SyntheticWorkload(
        options.prompt_len, options.output_len, vocab_low=10, vocab_high=300, seed=3
    )
    expected = [tokenizer.decode(list(shapes.next_shape().prompt)) for _ in range(3)]
    assert [path for path, _, _ in server.posts] == ["/v1/chat/completions"] * 3
    messages = [body["messages"] for _, _, body in server.posts]
    assert messages == [[{"role": "user", "content": text}] for text in expected]
    for text, record in zip(expected, results["requests"]):
        assert record["status"] == "OK" and record["num_completion_tokens"] == 6
        assert record["num_prompt_tokens"] == len(text.split()) + CHAT_TEMPLATE_TOKENS


def test_chat_sends_sharegpt_text_as_is(fake, tmp_path: Path) -> None:
    base_url, server = fake
    path = tmp_path / "sharegpt.json"
    turns = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there friend."}]
    path.write_text(json.dumps([{"conversations": turns}]))
    options = _options(base_url, backend="openai-chat", sharegpt_file=str(path), num_requests=2)
    results = run_serve_bench(options)
    assert all(body["messages"][0]["content"] == "Say hi." for _, _, body in server.posts)
    assert all(body["max_tokens"] == 4 for _, _, body in server.posts)
    assert [r["num_prompt_tokens"] for r in results["requests"]] == [2 + CHAT_TEMPLATE_TOKENS] * 2


def test_discovery_without_models_fails_before_sending(fake) -> None:
    base_url, server = fake
    server.models = []
    with pytest.raises(FailedPrecondition, match="--model"):
        run_serve_bench(_options(base_url))
    assert server.posts == []
