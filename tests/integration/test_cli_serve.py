"""The CLI as a user runs it: `pdserve serve` in its own process (its own local Ray), then
`pdserve generate`, `pdserve info` and the official `openai` client (streaming chat over the
HTTP API) against it, then Ctrl-C shuts it down cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.embedded import resolve_model_source
from pdserve.config import EMBEDDED_MODEL

pytestmark = pytest.mark.smollm2

PROMPT = "The capital of France is"
CHAT_QUESTION = "What is the capital of France?"
PDSERVE = [sys.executable, "-m", "pdserve.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference_text() -> str:
    model_dir = resolve_model_source(EMBEDDED_MODEL, None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def _wait_until_serving(address: str, server: subprocess.Popen[str]) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=240)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=240
        )
        for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise AssertionError(f"never SERVING; server exit code {server.poll()}")


def _stream_chat(base_url: str) -> tuple[str, list[str]]:
    """Streams a greedy chat answer with the openai client; returns its text and finish
    reasons."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=EMBEDDED_MODEL, messages=[{"role": "user", "content": CHAT_QUESTION}],
        max_tokens=16, temperature=0, stream=True,
    )
    text, reasons = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return text, reasons


def _reference_chat() -> str:
    model_dir = resolve_model_source(EMBEDDED_MODEL, None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_QUESTION}], add_generation_prompt=True,
        return_tensors="pt",
    )["input_ids"]
    out = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def test_serve_generate_info_and_ctrl_c(tmp_path: Path) -> None:
    port, http_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "ray": {"num_cpus": 4},
        "router": {"port": port, "http_port": http_port},
        "metrics": {"router_port": 0},
        "prefill": {"kv_cache": {"memory_mb": 64}},
        "decode": {"kv_cache": {"memory_mb": 64}},
    }))
    expected = _reference_text()
    expected_chat = _reference_chat()
    server = subprocess.Popen(
        [*PDSERVE, "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_until_serving(address, server)
        generated = subprocess.run(
            [*PDSERVE, "generate", "--address", address, "--temperature", "0",
             "--max-tokens", "16", PROMPT],
            capture_output=True, text=True, timeout=120,
        )
        info = subprocess.run(
            [*PDSERVE, "info", "--address", address], capture_output=True, text=True, timeout=60
        )
        chat_text, finish_reasons = _stream_chat(f"http://127.0.0.1:{http_port}/v1")
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=120)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.rstrip("\n") == expected.rstrip("\n")
    # One node: `auto` takes the shared-memory transport, and says so.
    assert "transport=shm" in generated.stderr
    assert info.returncode == 0 and "disaggregated" in info.stdout and "decode-0" in info.stdout
    assert chat_text == expected_chat and len(finish_reasons) == 1
    assert server.returncode == 0, output
