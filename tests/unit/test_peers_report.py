"""The pure parts of the peers benchmark (benchmarks/peers*.py): metrics from a load
generator result, the table, chart series and JSON, argument parsing and the command lines it
builds. Nothing here starts a server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers_report as report
from benchmarks.peers import bench_command, parse_args
from benchmarks.peers_llama import LlamaCache
from benchmarks.peers_servers import (
    ServerSpec,
    eos_free_model_dir,
    llama_spec,
    pdserve_config,
    transformers_spec,
)

REPO = Path(__file__).resolve().parents[2]


def _latency(p50: float | None, p99: float | None) -> dict[str, Any]:
    return {"count": 3, "mean": p50, "p50": p50, "p90": p99, "p99": p99, "max": p99}


def _bench_results(tok_s: float = 120.0, num_failed: int = 0) -> dict[str, Any]:
    """A cut-down `pdserve bench serve` results.json: what run_metrics reads."""
    ok = {
        "status": "OK",
        "num_completion_tokens": 64,
        "num_prompt_tokens": 150,
        "num_tokens_source": "usage",
    }
    failed = {"status": "HTTP_500", "num_completion_tokens": 0, "num_prompt_tokens": None}
    return {
        "summary": {
            "output_token_throughput_per_s": tok_s,
            "request_throughput_per_s": 1.5,
            "elapsed_s": 2.0,
            "num_ok": 2,
            "num_failed": num_failed,
            "failures": {"HTTP_500": {"count": 1, "example": "boom"}} if num_failed else {},
            "num_output_tokens": 128,
            "ttft_s": _latency(0.1, 0.4),
            "itl_s": _latency(0.02, 0.05),
        },
        "requests": [ok, dict(ok, num_completion_tokens=32)] + [failed] * num_failed,
    }


def _run(server: str, concurrency: int, tok_s: float, dtype: str = "float32") -> dict[str, Any]:
    return {
        "server": server,
        "dtype": dtype,
        "concurrency": concurrency,
        "error": None,
        "metrics": report.run_metrics(_bench_results(tok_s)),
    }


def test_run_metrics_takes_throughput_percentiles_and_ratios() -> None:
    metrics = report.run_metrics(_bench_results(num_failed=1))
    assert metrics["output_tok_per_s"] == 120.0
    assert (metrics["ttft_p50_s"], metrics["ttft_p99_s"]) == (0.1, 0.4)
    assert metrics["itl_p99_over_p50"] == pytest.approx(2.5)
    assert metrics["ttft_p99_over_p50"] == pytest.approx(4.0)
    assert (metrics["num_ok"], metrics["num_failed"]) == (2, 1)
    assert metrics["mean_output_tokens"] == 48  # failed requests left out
    assert metrics["mean_prompt_tokens"] == 150
    assert metrics["num_tokens_sources"] == ["usage"]


def test_run_metrics_without_latencies_has_no_ratio() -> None:
    results = _bench_results()
    results["summary"]["itl_s"] = _latency(None, None)
    results["requests"] = []
    metrics = report.run_metrics(results)
    assert metrics["itl_p99_over_p50"] is None and metrics["mean_output_tokens"] is None


def test_markdown_table_has_a_row_per_run_and_lists_failures() -> None:
    runs = [
        _run("pdserve", 1, 120.0),
        _run("llama.cpp", 1, 95.5),
        {
            "server": "transformers",
            "dtype": "float32",
            "concurrency": 1,
            "error": "exited with 1",
            "metrics": None,
        },
    ]
    table = report.markdown_table(runs).splitlines()
    assert table[0].startswith("| server | dtype | C | tok/s |")
    assert table[1].startswith("|---|---|---:|")
    assert table[2].startswith("| pdserve | float32 | 1 | 120.0 | 100.0 | 400.0 | 20.0 | 50.0 |")
    assert "| 2.50 | 2/0 | 48.0 | 150.0 |" in table[2]
    assert table[3].startswith("| llama.cpp | float32 | 1 | 95.5 |")
    assert table[-1] == "transformers float32 C=1: FAILED: exited with 1"
    runs[1]["metrics"] = report.run_metrics(_bench_results(num_failed=1))
    table = report.markdown_table(runs).splitlines()
    assert "llama.cpp float32 C=1: 1 x HTTP_500: boom" in table


def test_chart_series_one_line_per_server_sorted_by_concurrency() -> None:
    runs = [_run("pdserve", 8, 300.0), _run("pdserve", 1, 100.0), _run("llama.cpp", 1, 90.0)]
    assert report.chart_series(runs) == {
        "pdserve": [(1, 100.0), (8, 300.0)],
        "llama.cpp": [(1, 90.0)],
    }
    runs.append(_run("pdserve", 1, 150.0, dtype="bfloat16"))
    assert set(report.chart_series(runs)) == {
        "pdserve float32",
        "pdserve bfloat16",
        "llama.cpp float32",
    }


def test_write_json_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "peers.json"
    report.write_json(out, {"runs": [], "ratio": float("inf")})
    assert json.loads(out.read_text()) == {"runs": [], "ratio": None}
    pytest.importorskip("matplotlib")
    chart = report.write_chart(out.with_suffix(".png"), [_run("pdserve", 1, 100.0)], "t")
    assert chart is not None and chart.stat().st_size > 0
    assert report.write_chart(tmp_path / "none.png", [], "t") is None


def test_parse_args_defaults_and_quick() -> None:
    args = parse_args([])
    assert args.servers == ["pdserve", "pdserve-colocated", "llama.cpp", "transformers"]
    assert (args.dtypes, args.concurrency, args.requests) == (["float32"], [1, 8, 32], [8, 32, 64])
    assert args.threads == 2 and args.output_len == 64
    quick = parse_args(["--quick", "--servers", "llama.cpp"])
    assert (quick.servers, quick.concurrency, quick.requests) == (["llama.cpp"], [1], [4])
    assert parse_args(["--concurrency", "2,4", "--requests", "5"]).requests == [5, 5]


@pytest.mark.parametrize(
    "argv",
    [
        ["--servers", "vllm"],
        ["--dtypes", "float16"],
        ["--concurrency", "0"],
        ["--concurrency", "a"],
        ["--concurrency", "1,8", "--requests", "1,2,3"],
        ["--threads", "0"],
    ],
)
def test_parse_args_rejects_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_bench_command_drives_the_servers_openai_api(tmp_path: Path) -> None:
    args = parse_args(["--output-len", "32", "--seed", "7"])
    spec = ServerSpec("llama.cpp", ("x",), 8123, eos_handling="ignore_eos", model="peers-model")
    command = bench_command(
        args, spec, Path("/m"), concurrency=8, num_requests=32, out_dir=tmp_path
    )
    flags = dict(zip(command[6::2], command[7::2]))
    assert command[:3] == ["nice", "-n", "19"] and command[4:6] == ["bench", "serve"]
    assert flags["--base-url"] == "http://127.0.0.1:8123/v1"
    assert flags["--output-len"] == "fixed:32" and flags["--seed"] == "15"
    assert flags["--concurrency"] == "8" and flags["--num-requests"] == "32"
    assert flags["--model"] == "peers-model" and command[-1] == "--no-progress"
    assert "--no-ignore-eos-param" not in command
    strict = ServerSpec("transformers", ("x",), 8123, eos_handling="eos -1", send_ignore_eos=False)
    command = bench_command(args, strict, Path("/m"), 1, 4, tmp_path)
    assert "--no-ignore-eos-param" in command and "--model" not in command


def test_llama_spec_gives_every_slot_its_context() -> None:
    spec = llama_spec(
        Path("/b/llama-server"), Path("/m.gguf"), threads=2, parallel=8, slot_ctx=1024, port=9000
    )
    command = list(spec.command)
    assert command[command.index("-c") + 1] == "8192"
    assert command[command.index("-np") + 1] == "8"
    assert command[command.index("-t") + 1] == command[command.index("-tb") + 1] == "2"


def test_pdserve_config_sets_dtype_threads_and_ports() -> None:
    config = pdserve_config(REPO / "configs" / "local.yaml", "bfloat16", threads=2, http_port=8123)
    assert config["model"]["dtype"] == "bfloat16"
    assert config["prefill"]["resources"]["torch_threads"] == 1
    assert config["decode"]["resources"]["torch_threads"] == 1
    assert (config["router"]["http_port"], config["router"]["port"]) == (8123, 0)
    assert config["metrics"]["router_port"] == 0
    assert config["mode"] == "disaggregated"  # the engine defaults are kept


def test_llama_cache_layout(tmp_path: Path) -> None:
    cache = LlamaCache.for_version("9.9.9", base=tmp_path)
    assert cache.server_bin == tmp_path / "llama.cpp-9.9.9" / "build" / "bin" / "llama-server"
    assert cache.gguf(Path("/m/abc"), "float32") == cache.root / "abc-f32.gguf"
    assert cache.gguf(Path("/m/abc"), "bfloat16") == cache.root / "abc-bf16.gguf"


def test_transformers_gets_a_model_folder_without_eos(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "model.safetensors").write_bytes(b"weights")
    (hf_dir / "generation_config.json").write_text('{"eos_token_id": 2, "bos_token_id": 1}')
    served = eos_free_model_dir(hf_dir, tmp_path / "served")
    assert eos_free_model_dir(hf_dir, tmp_path / "served") == served  # a second call is a no-op
    assert (served / "model.safetensors").resolve() == (hf_dir / "model.safetensors").resolve()
    config = json.loads((served / "generation_config.json").read_text())
    assert config == {"eos_token_id": -1, "bos_token_id": 1}
    spec = transformers_spec(Path("/v/transformers"), served, "float32", 2, 9000, batching=True)
    assert not spec.send_ignore_eos and spec.model == str(served)
    assert "--continuous-batching" in spec.command and spec.env["OMP_NUM_THREADS"] == "2"
