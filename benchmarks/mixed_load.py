"""Disaggregated vs colocated under the same mixed load, in one run.

Starts a `pdserve.serve.Service` per mode, one after the other in one local Ray instance, with
the same model, dtype and total torch threads (disaggregated: 1 prefill + 1 decode replica;
colocated: 2 replicas that each prefill and decode, chunked prefill mixed into decode steps;
both chunk long prompts at `--prefill-chunk-tokens`),
and drives each with the same `pdserve bench serve` workload: steady short chats (Poisson
arrivals) plus a long prompt every few seconds. Reports p99 ITL, p50 TTFT and goodput at the
SLO per mode, their ratios against the issue's targets, and writes JSON plus a chart.

    python -m benchmarks.mixed_load --out bench-results/mixed_load          # ~6 min
    python -m benchmarks.mixed_load --quick --model <dir> --out /tmp/ml     # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from benchmarks.mixed_load_report import comparison, write_chart
from pdserve.config import EMBEDDED_MODEL, PdserveConfig, parse_config

MODES = ("disaggregated", "colocated")
SCHEMA = "pdserve.bench.mixed_load/1"


def mode_config(mode: str, args: argparse.Namespace) -> PdserveConfig:
    """The service of one mode: equal torch threads and Ray CPUs in total for both modes."""
    replica = {"num_cpus": 1, "torch_threads": args.torch_threads}
    kv_cache = {"memory_mb": args.kv_cache_mb}
    sections: dict[str, Any] = {
        "model": {"source": args.model, "dtype": args.dtype, "max_context_tokens": 2048},
        "mode": mode,
        "ray": {"num_cpus": 4, "namespace": "pdserve-bench"},
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0},
        "metrics": {"router_port": 0},
        "log_level": "WARNING",
    }
    if mode == "colocated":
        sections["colocated"] = {
            "replicas": 2, "resources": replica, "kv_cache": kv_cache,
            "max_prefill_tokens_per_step": args.prefill_chunk_tokens,
        }
    else:
        # Without prefill-side chunking a prompt is computed in one pass (an ablation).
        chunk = args.prefill_chunk_tokens if args.prefill_worker_chunking else 1_048_576
        sections["prefill"] = {
            "replicas": 1, "resources": replica, "kv_cache": kv_cache, "max_chunk_tokens": chunk,
        }
        sections["decode"] = {"replicas": 1, "resources": replica, "kv_cache": kv_cache}
    return parse_config(sections)


def run_mode(mode: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One service, one benchmark run; returns the bench summary (blocks for the run)."""
    from pdserve.bench.lengths import LengthDistribution
    from pdserve.bench.options import BenchOptions
    from pdserve.bench.serve_bench import run_serve_bench
    from pdserve.serve import Service

    with Service(mode_config(mode, args)) as service:
        warm_up(service.address, args)
        options = BenchOptions(
            address=service.address,
            rate_per_s=args.rate,
            prompt_len=LengthDistribution.parse(args.prompt_len),
            output_len=LengthDistribution.parse(args.output_len),
            long_every_s=args.long_every,
            long_prompt_len=args.long_prompt_len,
            long_output_len=LengthDistribution.parse("fixed:4"),
            duration_s=args.duration,
            seed=args.seed,
            slo_ttft_s=args.slo_ttft,
            slo_itl_p99_s=args.slo_itl_p99,
            out_dir=str(out_dir / mode),
            progress=not args.quick,
            vocab_low=args.vocab_low,
            vocab_high=args.vocab_high,
        )
        return run_serve_bench(options)["summary"]


def warm_up(address: str, args: argparse.Namespace) -> None:
    """One short and one long request per replica so first-pass costs stay out of the run."""
    from pdserve.client import GenerationClient, collect

    with GenerationClient(address, 300.0) as client:
        for num_tokens in (32, args.long_prompt_len) * 2:
            span = args.vocab_high - args.vocab_low
            prompt = [args.vocab_low + i % span for i in range(num_tokens)]
            collect(client.generate(prompt, max_tokens=4, ignore_eos=True))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
                 namespace="pdserve-bench")
    try:
        summaries = {mode: run_mode(mode, args, out_dir) for mode in args.modes}
    finally:
        if started_ray:
            ray.shutdown()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "command_line": ["python", "-m", "benchmarks.mixed_load", *(argv or sys.argv[1:])],
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "modes": summaries,
        "comparison": comparison(summaries),
    }
    (out_dir / "mixed_load.json").write_text(json.dumps(results, indent=2) + "\n")
    write_chart(summaries, out_dir / "mixed_load.png")
    for line in results["comparison"]["lines"]:
        print(line)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mixed_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256,
                        help="prompt tokens per colocated mixed step, and per disaggregated "
                             "prefill chunk (the same for both modes)")
    parser.add_argument("--prefill-worker-chunking", action=argparse.BooleanOptionalAction,
                        default=True, help="disaggregated: chunk long prompts on the prefill "
                        "replica (--no-... computes each prompt in one pass: an ablation)")
    parser.add_argument("--modes", type=_modes, default=MODES,
                        help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--rate", type=float, default=1.0, help="short chats per second")
    parser.add_argument("--prompt-len", default="uniform:32:128")
    parser.add_argument("--output-len", default="fixed:48")
    parser.add_argument("--long-every", type=float, default=6.0)
    parser.add_argument("--long-prompt-len", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=90.0)
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-itl-p99", type=float, default=0.3)
    parser.add_argument("--vocab-low", type=int, default=1000)
    parser.add_argument("--vocab-high", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds of light load (smoke test)")
    parser.add_argument("--out", default="bench-results/mixed_load")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rate, args.long_every = 4.0, 2.0, 2.0
        args.long_prompt_len, args.output_len, args.kv_cache_mb = 96, "fixed:6", 16
        args.prefill_chunk_tokens, args.prompt_len = 32, "uniform:8:24"
    return args


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes must be among {', '.join(MODES)}")
    return modes


if __name__ == "__main__":
    raise SystemExit(main())
