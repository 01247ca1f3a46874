"""The `pdserve` CLI and GenerationClient against an in-process fake Generation server."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import types
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from pdserve import cli
from pdserve.client import GenerationClient, collect, make_request
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

PIECES = (([17], "Hello"), ([18], ","), ([], ""), ([19, 20], " world"))
BAD_PROMPT = "please fail"


class FakeGeneration(pdserve_pb2_grpc.GenerationServicer):
    """Records requests; streams PIECES (with logprobs when asked) then a final message, or
    fails when the prompt text or the last chat message is BAD_PROMPT."""

    def __init__(self) -> None:
        self.requests: list[pdserve_pb2.GenerateRequest] = []

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        self.requests.append(request)
        if last_prompt_text(request) == BAD_PROMPT:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1]")
        for token_ids, text in PIECES:
            logprobs = [
                pdserve_pb2.TokenLogprobs(token_id=token_id, logprob=-0.5)
                for token_id in token_ids
                if request.sampling.logprobs
            ]
            yield pdserve_pb2.GenerateResponse(token_ids=token_ids, text=text, logprobs=logprobs)
        yield pdserve_pb2.GenerateResponse(final=final_info(len(request.text.split())))

    def Info(self, request, context):  # noqa: N802
        replica = pdserve_pb2.ReplicaInfo(
            replica_id="decode-0",
            state=pdserve_pb2.REPLICA_STATE_READY,
            num_active_requests=3,
            num_free_blocks=90,
            num_total_blocks=128,
            node_id="abcdef0123456789",
        )
        return pdserve_pb2.InfoResponse(
            model="embedded:smollm2-135m-instruct",
            dtype="float32",
            mode="disaggregated",
            kv_transport="grpc",
            prefill=pdserve_pb2.PoolInfo(configured_replicas=2),
            decode=pdserve_pb2.PoolInfo(configured_replicas=1, replicas=[replica]),
            version="0.1.0",
            kv_block_size=16,
            max_context_tokens=2048,
        )


def last_prompt_text(request: pdserve_pb2.GenerateRequest) -> str:
    if request.WhichOneof("prompt") == "messages":
        return request.messages.messages[-1].content
    return request.text


def chat_roles(request: pdserve_pb2.GenerateRequest) -> list[tuple[str, str]]:
    """The (role, content) pairs of a chat request."""
    assert request.WhichOneof("prompt") == "messages", request
    return [(message.role, message.content) for message in request.messages.messages]


def final_info(num_prompt_tokens: int) -> pdserve_pb2.FinalInfo:
    num_tokens = sum(len(ids) for ids, _ in PIECES)
    return pdserve_pb2.FinalInfo(
        finish_reason=pdserve_pb2.FINISH_REASON_LENGTH,
        usage=pdserve_pb2.Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_tokens),
        request_id="req-42",
        served_by=pdserve_pb2.ServedBy(
            mode="disaggregated",
            kv_transport="grpc",
            prefill_replica="prefill-1",
            decode_replica="decode-0",
            kv_bytes=4096,
        ),
    )


@contextmanager
def serving(servicer: pdserve_pb2_grpc.GenerationServicer) -> Iterator[str]:
    """Serves `servicer` on a loopback port; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pdserve_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeGeneration]]:
    servicer = FakeGeneration()
    with serving(servicer) as address:
        yield address, servicer


def test_generate_flags_reach_the_request(fake, capsys) -> None:
    address, servicer = fake
    argv = [
        "generate", "--address", address, "--max-tokens", "7", "--temperature", "0.5",
        "--top-p", "0.9", "--top-k", "40", "--seed", "123", "--stop", "\n\n", "--stop", "END",
        "--stop-token-id", "2", "--ignore-eos", "--timeout", "30", "the prompt",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (request,) = servicer.requests
    assert request.WhichOneof("prompt") == "text" and request.text == "the prompt"
    sampling = request.sampling
    assert sampling.max_tokens == 7
    assert sampling.temperature == pytest.approx(0.5)
    assert sampling.top_p == pytest.approx(0.9)
    assert sampling.top_k == 40
    assert sampling.HasField("seed") and sampling.seed == 123
    assert list(sampling.stop) == ["\n\n", "END"]
    assert list(sampling.stop_token_ids) == [2]
    assert sampling.ignore_eos is True
    out, err = capsys.readouterr()
    assert out == "Hello, world\n"
    summary = err.strip()
    assert "\n" not in summary
    expected = (
        "finish=LENGTH prompt_tokens=2 completion_tokens=4 transport=grpc "
        "replicas=prefill-1->decode-0 request_id=req-42 ttft= tokens/s="
    )
    for part in expected.split():
        assert part in summary


def test_generate_defaults(fake, capsys) -> None:
    address, servicer = fake
    assert cli.main(["generate", "--address", address, "hi"]) == 0
    sampling = servicer.requests[0].sampling
    assert sampling.max_tokens == 128
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.0, 0.0, 0)
    assert not sampling.HasField("seed")
    assert list(sampling.stop) == [] and list(sampling.stop_token_ids) == []
    assert sampling.ignore_eos is False


def test_grpc_error_prints_code_and_details(fake, capsys) -> None:
    address, _ = fake
    assert cli.main(["generate", "--address", address, BAD_PROMPT]) == 1
    err = capsys.readouterr().err
    assert "error: INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]" in err


def test_unreachable_server_is_unavailable(capsys) -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["generate", "--address", f"127.0.0.1:{port}", "--timeout", "20", "hi"]
    assert cli.main(argv) == 1
    assert "error: UNAVAILABLE:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [["--max-tokens", "0"], ["--max-tokens", "x"], ["--top-k", "-1"], ["--seed", str(2**64)]],
)
def test_out_of_range_flags_exit_2(flags, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", *flags, "hi"])
    assert info.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_info_prints_pools(fake, capsys) -> None:
    address, _ = fake
    assert cli.main(["info", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "embedded:smollm2-135m-instruct (float32)" in out
    assert "disaggregated, KV transport grpc" in out
    assert "prefill     0/2 replicas" in out
    assert "decode      1/1 replicas" in out
    replica_line = next(line for line in out.splitlines() if "decode-0" in line)
    for part in ("READY", "active=3", "free_blocks=90/128", "node=abcdef012345"):
        assert part in replica_line


def test_client_token_id_prompt_and_collect(fake) -> None:
    address, servicer = fake
    with GenerationClient(address, timeout_s=30) as client:
        pieces: list[str] = []
        result = collect(client.generate([5, 6, 7], max_tokens=3), on_text=pieces.append)
    assert list(servicer.requests[0].token_ids.ids) == [5, 6, 7]
    assert result.token_ids == [17, 18, 19, 20]
    assert result.text == "Hello, world" and pieces == ["Hello", ",", " world"]
    assert result.final is not None and result.final.request_id == "req-42"
    assert 0 <= result.ttft_s <= result.total_s
    assert result.tokens_per_s >= 0


def test_make_request_leaves_seed_unset() -> None:
    assert not make_request("x", max_tokens=1).sampling.HasField("seed")
    assert make_request("x", max_tokens=1, seed=0).sampling.HasField("seed")


def _write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pdserve.yaml"
    path.write_text(text)
    return str(path)


def test_serve_with_bad_config_exits_2(tmp_path, capsys) -> None:
    config = _write_config(tmp_path, "decode:\n  replica: 2\n")
    assert cli.main(["serve", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "decode.replica: unknown key" in err and "replicas" in err


def test_serve_with_missing_config_exits_2(tmp_path, capsys) -> None:
    assert cli.main(["serve", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_ray_address_precedence(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.resolve_ray_address(None, None) is None
    assert cli.resolve_ray_address(None, "auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "env-head:6379")
    assert cli.resolve_ray_address(None, "auto") == "env-head:6379"
    assert cli.resolve_ray_address("flag-head:6379", "auto") == "flag-head:6379"


class FakeService:
    """Stands in for pdserve.serve.Service; its wait() delivers SIGTERM's handler."""

    instances: list[FakeService] = []

    def __init__(self, config, ray_address=None) -> None:
        self.config = config
        self.ray_address = ray_address
        self.calls: list[str] = []
        self.address = "127.0.0.1:6000"
        self.http_base_url = "http://127.0.0.1:8000/v1"
        FakeService.instances.append(self)

    def start(self) -> None:
        self.calls.append("start")

    def wait(self) -> None:
        self.calls.append("wait")
        assert threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "serve installs no SIGTERM handler"
        handler(signal.SIGTERM, None)

    def stop(self) -> None:
        self.calls.append("stop")


def test_serve_runs_until_sigterm_then_stops(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pdserve.serve", types.SimpleNamespace(Service=FakeService))
    monkeypatch.setenv("RAY_ADDRESS", "env-head:6379")
    FakeService.instances.clear()
    before = signal.getsignal(signal.SIGTERM)
    config = _write_config(tmp_path, "ray:\n  address: auto\nrouter:\n  port: 6000\n")
    assert cli.main(["serve", "--config", config]) == 0
    (service,) = FakeService.instances
    assert service.calls == ["start", "wait", "stop"]
    assert service.ray_address == "env-head:6379"
    assert service.config.router.port == 6000
    out = capsys.readouterr().out
    assert "listening on 127.0.0.1:6000" in out
    assert "OpenAI-compatible API on http://127.0.0.1:8000/v1" in out
    assert signal.getsignal(signal.SIGTERM) is before


class FakeScaling(pdserve_pb2_grpc.GenerationServicer, pdserve_pb2_grpc.AdminServicer):
    """Admin.Scale records the targets (cap 4, like a real pool); Info shows each pool with
    one READY replica more per call until it reaches its target (a scale-up in progress)."""

    def __init__(self) -> None:
        self.targets = {"prefill": 1, "decode": 2}
        self.ready = dict(self.targets)
        self.scale_requests: list[pdserve_pb2.ScaleRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.num_info_calls = 0

    def Scale(self, request, context):  # noqa: N802
        self.scale_requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        for pool, count in request.target_replicas.items():
            if not 1 <= count <= 4:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f'target_replicas["{pool}"]: {count} replicas is out of range [1, 4]',
                )
        previous = dict(self.targets)
        self.targets.update(request.target_replicas)
        return pdserve_pb2.ScaleResponse(
            previous_target_replicas=previous, target_replicas=self.targets
        )

    def Info(self, request, context):  # noqa: N802
        self.num_info_calls += 1
        pools = {}
        for pool, target in self.targets.items():
            self.ready[pool] = min(target, self.ready[pool] + 1)
            replicas = [
                pdserve_pb2.ReplicaInfo(
                    replica_id=f"{pool}-{i}", state=pdserve_pb2.REPLICA_STATE_READY
                )
                for i in range(self.ready[pool])
            ]
            pools[pool] = pdserve_pb2.PoolInfo(
                configured_replicas=1, replicas=replicas, target_replicas=target,
                min_replicas=1, max_replicas=4, autoscale=pool == "decode",
            )
        return pdserve_pb2.InfoResponse(mode="disaggregated", **pools)


@pytest.fixture
def fake_scaling() -> Iterator[tuple[str, FakeScaling]]:
    servicer = FakeScaling()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pdserve_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    pdserve_pb2_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_scale_sends_the_pool_sizes_and_prints_the_change(fake_scaling, capsys) -> None:
    address, servicer = fake_scaling
    assert cli.main(["scale", "--target", address, "--prefill", "3", "--decode", "2"]) == 0
    (request,) = servicer.scale_requests
    assert dict(request.target_replicas) == {"prefill": 3, "decode": 2}
    out = capsys.readouterr().out
    assert "prefill     1 -> 3 replicas" in out
    assert "decode      2 -> 2 replicas (same)" in out
    assert servicer.num_info_calls == 0  # without --wait it returns at once


def test_scale_wait_polls_info_until_the_pools_settle(fake_scaling, capsys) -> None:
    address, servicer = fake_scaling
    argv = ["scale", "--address", address, "--prefill", "4", "--wait", "--wait-timeout", "60"]
    assert cli.main(argv) == 0
    assert servicer.num_info_calls == 3  # 2/4, 3/4, then 4/4 READY
    assert "pools settled" in capsys.readouterr().out


def test_scale_reads_the_token_file_and_a_config(fake_scaling, tmp_path, capsys) -> None:
    address, servicer = fake_scaling
    token_file = tmp_path / "token"
    token_file.write_text("# the operator's token\n\nabcdefghijklmnop0123\n")
    config = _write_config(tmp_path, "prefill:\n  replicas: 2\ndecode:\n  replicas: 3\n")
    argv = ["scale", "--address", address, "--config", config, "--decode", "4",
            "--token-file", str(token_file)]  # fmt: skip
    assert cli.main(argv) == 0
    assert dict(servicer.scale_requests[0].target_replicas) == {"prefill": 2, "decode": 4}
    assert servicer.metadata[0]["authorization"] == "Bearer abcdefghijklmnop0123"


def test_scale_refused_by_the_server_exits_1(fake_scaling, capsys) -> None:
    address, _ = fake_scaling
    assert cli.main(["scale", "--address", address, "--decode", "9"]) == 1
    err = capsys.readouterr().err
    assert 'error: INVALID_ARGUMENT: target_replicas["decode"]: 9 replicas' in err


@pytest.mark.parametrize("flags", [[], ["--decode", "0"], ["--prefill", "x"]])
def test_scale_without_a_valid_size_exits_2(flags, capsys) -> None:
    try:
        code = cli.main(["scale", "--address", "127.0.0.1:1", *flags])
    except SystemExit as exc:  # argparse rejects a bad value itself
        code = exc.code
    assert code == 2
    assert "--" in capsys.readouterr().err


def test_info_shows_targets_and_autoscaling(fake_scaling, capsys) -> None:
    address, servicer = fake_scaling
    servicer.targets["prefill"] = 3
    servicer.ready["prefill"] = 0
    assert cli.main(["info", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "prefill     1/1 replicas (target 3)" in out
    assert "decode      2/1 replicas (target 2, autoscale 1..4)" in out
