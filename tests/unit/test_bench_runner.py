"""The load generator's runner against an in-process fake Generation server (no Ray): what it
sends, its bounds, the mix, failures and token accounting."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from pdserve.bench import BenchOptions, run_serve_bench
from pdserve.bench.arrivals import poisson_arrivals
from pdserve.bench.lengths import LengthDistribution
from pdserve.bench.workload import seeded_rng
from pdserve.errors import InvalidArgument
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

MAX_CONTEXT_TOKENS = 256
FAILING_MAX_TOKENS = 5  # the fake refuses requests asking for exactly this many tokens


class FakeGeneration(pdserve_pb2_grpc.GenerationServicer):
    """Streams max_tokens tokens: one, then singles, the last two together; then a final.
    Tracks the requests and the most main (short-prompt) streams open at once."""

    def __init__(self) -> None:
        self.requests: list[pdserve_pb2.GenerateRequest] = []
        self._lock = threading.Lock()
        self._num_open_main = 0
        self.max_open_main = 0

    def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        is_main = len(request.token_ids.ids) < 100
        with self._lock:
            self.requests.append(request)
            if is_main:
                self._num_open_main += 1
                self.max_open_main = max(self.max_open_main, self._num_open_main)
        try:
            num_tokens = request.sampling.max_tokens
            if num_tokens == FAILING_MAX_TOKENS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "decode pool full")
            sizes = [1] * (num_tokens - 2) + [2] if num_tokens >= 3 else [1] * num_tokens
            for size in sizes:
                yield pdserve_pb2.GenerateResponse(token_ids=[7] * size, text="x")
            yield pdserve_pb2.GenerateResponse(final=_final(request, num_tokens))
        finally:
            if is_main:
                with self._lock:
                    self._num_open_main -= 1

    def Info(self, request, context):  # noqa: N802
        return pdserve_pb2.InfoResponse(
            model="fake", dtype="float32", mode="disaggregated", kv_transport="grpc",
            max_context_tokens=MAX_CONTEXT_TOKENS,
        )  # fmt: skip


def _final(request: pdserve_pb2.GenerateRequest, num_tokens: int) -> pdserve_pb2.FinalInfo:
    return pdserve_pb2.FinalInfo(
        finish_reason=pdserve_pb2.FINISH_REASON_LENGTH,
        usage=pdserve_pb2.Usage(
            prompt_tokens=len(request.token_ids.ids), completion_tokens=num_tokens
        ),
        timings=pdserve_pb2.Timings(prefill_s=0.01, total_s=0.02),
        request_id=f"req-{id(request)}",
        served_by=pdserve_pb2.ServedBy(mode="disaggregated", kv_transport="grpc"),
    )


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeGeneration]]:
    servicer = FakeGeneration()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pdserve_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _options(address: str, **overrides: Any) -> BenchOptions:
    values: dict[str, Any] = {
        "address": address,
        "prompt_len": LengthDistribution.parse("uniform:4:20"),
        "output_len": LengthDistribution.parse("uniform:1:8"),
        "vocab_low": 10,
        "vocab_high": 50,
        "seed": 3,
        "progress": False,
        "out_dir": None,
    }
    values.update(overrides)
    return BenchOptions(**values)


def test_closed_loop_sends_exactly_n_with_at_most_c_in_flight(fake) -> None:
    address, servicer = fake
    options = _options(
        address, concurrency=3, num_requests=9, output_len=LengthDistribution.parse("uniform:6:8")
    )
    results = run_serve_bench(options)

    requests = results["requests"]
    assert len(requests) == len(servicer.requests) == 9
    assert servicer.max_open_main <= 3
    assert all(request.sampling.ignore_eos for request in servicer.requests)
    sent_max_tokens = sorted(request.sampling.max_tokens for request in servicer.requests)
    assert sorted(record["max_tokens"] for record in requests) == sent_max_tokens
    for record in requests:
        assert record["status"] == "OK"
        assert record["num_completion_tokens"] == record["max_tokens"]
        assert len(record["itl_s"]) == record["num_completion_tokens"] - 1
        assert sum(record["message_num_tokens"]) == record["num_completion_tokens"]
        assert record["message_num_tokens"][-1] == 2  # the fake's last message carries two
        assert 0 < record["ttft_s"] <= record["e2e_s"]
        assert record["served_by"]["kv_transport"] == "grpc"
        assert record["server_timings"]["prefill_s"] == pytest.approx(0.01)
    summary = results["summary"]
    assert summary["num_ok"] == 9 and summary["failures"] == {}
    assert summary["num_output_tokens"] == sum(r.sampling.max_tokens for r in servicer.requests)
    assert results["server"]["model"] == "fake"


def test_the_mix_adds_long_prompts_on_top(fake) -> None:
    address, servicer = fake
    options = _options(
        address, concurrency=2, num_requests=6, long_every_s=60.0, long_start_s=0.0,
        long_prompt_len=150, long_output_len=LengthDistribution.parse("fixed:4"),
    )  # fmt: skip
    results = run_serve_bench(options)

    kinds = [record["kind"] for record in results["requests"]]
    assert kinds.count("main") == 6 and kinds.count("long") == 1  # at 0; the next is at 60 s
    (long,) = [record for record in results["requests"] if record["kind"] == "long"]
    assert long["num_prompt_tokens"] == 150 and long["num_completion_tokens"] == 4
    assert len(results["long_arrivals_s"]) == 1
    assert set(results["summary"]["by_kind"]) == {"main", "long"}


def test_failures_are_recorded_with_their_status(fake) -> None:
    address, _ = fake
    options = _options(address, concurrency=2, num_requests=30)
    results = run_serve_bench(options)

    failing = [r for r in results["requests"] if r["max_tokens"] == FAILING_MAX_TOKENS]
    assert failing, "the seeded workload should ask for the failing length at least once"
    assert all(r["status"] == "RESOURCE_EXHAUSTED" for r in failing)
    assert all(r["error"] == "decode pool full" for r in failing)
    summary = results["summary"]
    assert summary["failures"]["RESOURCE_EXHAUSTED"]["count"] == len(failing)
    assert summary["num_ok"] == 30 - len(failing)


def test_open_loop_stops_at_the_duration_on_its_own_schedule(fake) -> None:
    address, servicer = fake
    options = _options(address, rate_per_s=20.0, duration_s=0.5)
    arrivals = poisson_arrivals(20.0, seeded_rng(options.seed, "arrivals"))
    expected = []
    for at_s in arrivals:
        if at_s >= 0.5:
            break
        expected.append(at_s)
    results = run_serve_bench(options)

    assert [r["scheduled_s"] for r in results["requests"]] == pytest.approx(expected, abs=1e-6)
    assert len(servicer.requests) == len(expected)


def test_workload_too_long_for_the_server_fails_before_sending(fake) -> None:
    address, servicer = fake
    options = _options(
        address, concurrency=1, num_requests=2, long_every_s=1.0, long_prompt_len=MAX_CONTEXT_TOKENS
    )
    with pytest.raises(InvalidArgument) as info:
        run_serve_bench(options)
    assert info.value.field == "--long-prompt-len"
    assert servicer.requests == []


def test_sharegpt_prompts_go_as_text_with_the_reply_length(fake, tmp_path) -> None:
    address, servicer = fake
    path = tmp_path / "sharegpt.json"
    turns = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there friend."}]
    path.write_text(json.dumps([{"conversations": turns}, {"conversations": []}]))
    options = _options(address, concurrency=1, num_requests=3, sharegpt_file=str(path))
    results = run_serve_bench(options)

    assert [request.text for request in servicer.requests] == ["Say hi."] * 3
    assert all(request.sampling.max_tokens == 4 for request in servicer.requests)  # 3 words
    assert results["workload"] == {
        "source": "sharegpt", "num_conversations_used": 1, "num_entries_skipped": 1,
        "num_conversations_too_long": 0,
    }  # fmt: skip
    assert results["summary"]["num_ok"] == 3
