"""Capacity under real chat traffic: decode KV reserved on demand vs for the worst case.

One run starts the same service twice, one after the other in one local Ray instance: the
default config (`configs/local.yaml`: SmolLM2 fp32, 1 prefill + 1 decode replica, a 512 MiB
decode cache) with `decode.kv_cache.reservation: full` (prompt + max_tokens reserved up front),
then with `on_demand` (prompt + one block, growing as the sequence does, preempting by
recompute when the cache is full). Each is driven in a closed loop at each concurrency with
real chat questions (`benchmarks/data/chat_questions.json`), `max_tokens` 1,024 and EOS
honoured, so every answer has its natural length, through gRPC `Generate` with chat
`messages`. Reports completed and refused requests, output tokens/s, TTFT and inter-token gaps
(p50/p99), time queued at the router and preemptions; writes JSON and a chart.

    python -m benchmarks.capacity --out bench-results/capacity            # about 15 min
    python -m benchmarks.capacity --quick --out /tmp/capacity             # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.capacity_driver import closed_loop
from benchmarks.capacity_report import summarize, targets, write_chart
from pdserve.config import PdserveConfig, load_config

POLICIES = ("full", "on_demand")
SCHEMA = "pdserve.bench.capacity/1"
QUESTIONS_FILE = Path(__file__).parent / "data" / "chat_questions.json"


def service_config(policy: str, args: argparse.Namespace) -> PdserveConfig:
    """The default config with the reservation policy set and free ports (nothing else)."""
    config = load_config(args.config)
    decode = config.decode.model_copy(
        update={"kv_cache": config.decode.kv_cache.model_copy(update={"reservation": policy})}
    )
    return config.model_copy(update={
        "decode": decode,
        "router": config.router.model_copy(update={"port": 0, "http_port": None}),
        "metrics": config.metrics.model_copy(update={"router_port": 0}),
        "ray": config.ray.model_copy(update={"namespace": "pdserve-bench"}),
        "log_level": "WARNING",
    })


def run_policy(policy: str, questions: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One service, every concurrency in turn; returns {concurrency: summary}."""
    from pdserve.serve import Service

    results: dict[str, Any] = {}
    with Service(service_config(policy, args)) as service:
        asyncio.run(closed_loop(service.address, questions[:2], 1, 2, args.max_tokens))  # warm
        for concurrency in args.concurrency:
            run = asyncio.run(closed_loop(
                service.address, questions, concurrency,
                args.requests_per_stream * concurrency, args.max_tokens,
            ))
            results[str(concurrency)] = summarize(run)
            print(f"{policy:9s} C={concurrency:<3d} {_line(results[str(concurrency)])}",
                  flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    from pdserve.bench.machine import machine_facts

    questions = json.loads(QUESTIONS_FILE.read_text(encoding="utf-8"))
    machine = machine_facts()
    policies = {policy: run_policy(policy, questions, args) for policy in args.policies}
    machine["loadavg_end"] = list(os.getloadavg())
    results = {
        "schema": SCHEMA,
        "command_line": ["python", "-m", "benchmarks.capacity", *(argv or sys.argv[1:])],
        "machine": machine,
        "settings": {**vars(args), "num_questions": len(questions)},
        "policies": policies,
        "targets": [targets(policies, str(c)) for c in args.concurrency],
    }
    (out_dir / "capacity.json").write_text(json.dumps(results, indent=2) + "\n")
    write_chart(results, out_dir / "capacity.png")
    print(json.dumps(results["targets"], indent=2))
    return 0


def _line(summary: dict[str, Any]) -> str:
    return (
        f"ok {summary['num_ok']} refused {summary['num_refused']} "
        f"failed {summary['num_failed']}  {summary['output_tokens_per_s']:.1f} tok/s "
        f"(steady {summary['steady_output_tokens_per_s']:.1f})  "
        f"TTFT p50 {summary['ttft_s']['p50']:.2f}s  ITL p99 {summary['itl_s']['p99']:.3f}s  "
        f"preemptions {summary['num_preemptions']}"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--requests-per-stream", type=int, default=2,
                        help="requests per concurrent stream (default 2)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency = [2, 4]
        args.requests_per_stream = 1
        args.max_tokens = 12
    return args


if __name__ == "__main__":
    sys.exit(main())
