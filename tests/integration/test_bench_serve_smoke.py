"""Smoke test of `pdserve bench serve` against a real service on the tiny model: the CLI entry
point run in-process, closed loop with the long-prompt mix, then results.json and the charts."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve import cli
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_MAIN_REQUESTS = 8
LONG_PROMPT_TOKENS = 200
# The tiny model's byte-level vocabulary has 400 ids; 0 is EOS (ignored anyway).
VOCAB_LOW, VOCAB_HIGH = 3, 300


def test_bench_serve_on_the_tiny_model(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    with Service(make_config(str(tiny_model_dir))) as service:
        argv = [
            "bench", "serve", "--address", service.address, "--concurrency", "2",
            "--num-requests", str(NUM_MAIN_REQUESTS), "--prompt-len", "uniform:8:64",
            "--output-len", "fixed:12", "--vocab-low", str(VOCAB_LOW),
            "--vocab-high", str(VOCAB_HIGH), "--mix", "--long-every", "0.5",
            "--long-start", "0", "--long-prompt-len", str(LONG_PROMPT_TOKENS),
            "--long-output-len", "fixed:4", "--slo-ttft", "10", "--slo-itl-p99", "10",
            "--seed", "7", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        assert cli.main(argv) == 0
        assert_quiet(service)

    results = json.loads((out / "results.json").read_text())
    assert {"schema", "command_line", "options", "machine", "server", "summary",
            "long_arrivals_s", "requests"} <= set(results)  # fmt: skip
    assert results["command_line"][:3] == ["pdserve", "bench", "serve"]
    assert results["machine"]["cpu_count"] >= 1 and "loadavg_end" in results["machine"]
    assert results["server"]["max_context_tokens"] == 512

    requests = results["requests"]
    main = [record for record in requests if record["kind"] == "main"]
    long = [record for record in requests if record["kind"] == "long"]
    assert len(main) == NUM_MAIN_REQUESTS
    assert len(long) >= 1 and len(long) == len(results["long_arrivals_s"])
    for record in requests:
        assert record["status"] == "OK", record
        assert record["num_completion_tokens"] == record["max_tokens"]  # ignore_eos
        assert len(record["itl_s"]) == record["num_completion_tokens"] - 1
        assert record["served_by"]["mode"] == "disaggregated"
        assert record["server_timings"]["total_s"] > 0
        assert 0 < record["ttft_s"] <= record["e2e_s"]
    assert all(r["max_tokens"] == 12 for r in main)
    assert all(r["num_prompt_tokens"] == LONG_PROMPT_TOKENS for r in long)

    summary = results["summary"]
    assert summary["num_requests"] == len(requests) == summary["num_ok"]
    assert summary["num_failed"] == 0 and summary["failures"] == {}
    assert summary["num_slo_met"] == len(requests)  # generous SLO: everything meets it
    assert summary["request_throughput_per_s"] > 0 and summary["output_token_throughput_per_s"] > 0
    for metric in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        figures = summary[metric]
        assert figures["count"] > 0, metric
        assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"], metric

    for name in ("latency_cdf.png", "itl_over_time.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_bench_serve_over_the_openai_completions_api(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The same workload through pdserve's own OpenAI HTTP API: every request OK, token counts
    from the server's usage, a gap per content chunk, the target named in results.json."""
    out = tmp_path / "bench-openai"
    with Service(make_config(str(tiny_model_dir))) as service:
        base_url = service.http_base_url
        argv = [
            "bench", "serve", "--backend", "openai-completions",
            "--base-url", base_url, "--concurrency", "2",
            "--num-requests", str(NUM_MAIN_REQUESTS), "--prompt-len", "uniform:8:64",
            "--output-len", "fixed:12", "--vocab-low", str(VOCAB_LOW),
            "--vocab-high", str(VOCAB_HIGH), "--seed", "7", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        assert cli.main(argv) == 0
        assert_quiet(service)
    results = json.loads((out / "results.json").read_text())
    assert results["target"]["backend"] == "openai-completions"
    assert results["target"]["url"] == base_url
    assert results["server"]["max_context_tokens"] == 512
    for record in results["requests"]:
        assert record["status"] == "OK", record
        assert record["num_completion_tokens"] == 12  # ignore_eos was sent and honoured
        assert record["num_tokens_source"] == "usage"
        assert 0 < record["ttft_s"] <= record["e2e_s"]
    assert results["summary"]["num_ok"] == NUM_MAIN_REQUESTS
