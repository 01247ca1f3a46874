"""The OpenAI HTTP layer's cost: the same service driven over gRPC and over HTTP, in one run.

Starts one `pdserve.serve.Service` (the embedded SmolLM2 in fp32 by default: 1 prefill + 1
decode replica, one torch thread each, as `configs/local.yaml`) and drives it with the same
`pdserve bench serve` closed-loop workload (token-id prompts, fixed output length, EOS
ignored) over three front doors, one after the other, at each concurrency: gRPC `Generate`,
HTTP `/v1/completions` (the very same token ids) and HTTP `/v1/chat/completions` (the same ids
decoded into one user message, so its prompts are a few template tokens longer). The
backends take turns within each concurrency, so a slow drift of the machine hits them alike.
The prefill replica's prefix cache is off, since all backends send the same prompts. Reports
TTFT and inter-token gaps per backend with the HTTP/gRPC ratios, and writes JSON plus a chart.

    python -m benchmarks.http_overhead --out bench-results/http_overhead      # ~8 min
    python -m benchmarks.http_overhead --quick --model <dir> --out /tmp/ho    # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.http_overhead_report import comparison, write_chart
from pdserve.config import EMBEDDED_MODEL, PdserveConfig, parse_config

BACKENDS = ("grpc", "openai-completions", "openai-chat")
SCHEMA = "pdserve.bench.http_overhead/1"


def service_config(args: argparse.Namespace) -> PdserveConfig:
    replica = {"num_cpus": 1, "torch_threads": 1}
    return parse_config({
        "model": {"source": args.model, "dtype": args.dtype, "max_context_tokens": 2048},
        "ray": {"num_cpus": 4, "namespace": "pdserve-bench"},
        # Every backend sends the same prompts: with the prefix cache on, the second backend
        # would find them cached and its TTFT would measure the cache, not the front door.
        "prefill": {"replicas": 1, "resources": replica, "prefix_caching": False},
        "decode": {"replicas": 1, "resources": replica},
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0},
        "metrics": {"router_port": 0},
        "log_level": "WARNING",
    })


def run_backend(
    backend: str, concurrency: int, service: Any, tokenizer_dir: str,
    args: argparse.Namespace, out_dir: Path,
) -> dict[str, Any]:
    """One closed-loop run over one backend; returns the bench summary."""
    from pdserve.bench.lengths import LengthDistribution
    from pdserve.bench.options import BenchOptions
    from pdserve.bench.serve_bench import run_serve_bench

    target: dict[str, Any] = {"address": service.address}
    if backend != "grpc":
        target = {"base_url": service.http_base_url}
    if backend == "openai-chat":
        target["tokenizer"] = tokenizer_dir
    options = BenchOptions(
        backend=backend,
        concurrency=concurrency,
        num_requests=args.requests_per_stream * concurrency,
        prompt_len=LengthDistribution.parse(args.prompt_len),
        output_len=LengthDistribution.parse(args.output_len),
        vocab_low=args.vocab_low,
        vocab_high=args.vocab_high,
        seed=args.seed,
        out_dir=str(out_dir / f"c{concurrency}-{backend}"),
        progress=not args.quick,
        **target,
    )
    return run_serve_bench(options)["summary"]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    from engine.embedded import resolve_model_source
    from pdserve.bench.machine import machine_facts
    from pdserve.serve import Service

    tokenizer_dir = resolve_model_source(args.model, None)
    summaries: dict[str, dict[str, Any]] = {}
    with Service(service_config(args)) as service:
        _warm_up(service, tokenizer_dir, args, out_dir)
        for concurrency in args.concurrency:
            for backend in BACKENDS:
                key = f"c{concurrency}/{backend}"
                summaries[key] = run_backend(
                    backend, concurrency, service, tokenizer_dir, args, out_dir
                )
    machine = {**machine_facts(), "loadavg_end": list(os.getloadavg())}
    results = {
        "schema": SCHEMA,
        "command_line": ["python", "-m", "benchmarks.http_overhead", *(argv or sys.argv[1:])],
        "machine": machine,
        "settings": vars(args),
        "summaries": summaries,
        "comparison": comparison(summaries, args.concurrency),
    }
    (out_dir / "http_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    write_chart(results, out_dir / "http_overhead.png")
    print(json.dumps(results["comparison"], indent=2))
    return 0


def _warm_up(service: Any, tokenizer_dir: str, args: argparse.Namespace, out_dir: Path) -> None:
    """A few requests per backend so first-call costs stay out of the measured runs."""
    warm = argparse.Namespace(**{**vars(args), "requests_per_stream": 2, "quick": True})
    for backend in BACKENDS:
        run_backend(backend, 1, service, tokenizer_dir, warm, out_dir / "warm-up")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests-per-stream", type=int, default=8,
                        help="requests per concurrent stream and backend (default 8)")
    parser.add_argument("--prompt-len", default="uniform:100:300")
    parser.add_argument("--output-len", default="fixed:64")
    parser.add_argument("--vocab-low", type=int, default=1000)
    parser.add_argument("--vocab-high", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency = [1, 2]
        args.requests_per_stream = 2
        args.prompt_len = "uniform:8:32"
        args.output_len = "fixed:6"
    return args


if __name__ == "__main__":
    sys.exit(main())
