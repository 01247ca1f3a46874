"""Prefix caching on the prefill replicas: time to first token of requests that share a long
system prompt, with `prefill.prefix_caching` on and off, in one run.

Starts a `pdserve.serve.Service` per setting (1 prefill + 1 decode replica, one torch thread
each), both at once in one local Ray instance, and sends each the same requests one at a time,
alternating between the services: a 1,000-token system prompt followed by a different short
user suffix per request. The first request computes the system prompt either way ("cold");
with caching on, the later ones ("warm") compute only their suffix. Records the client's and
the server's time to first token, the prefill pass time and the prefill replica's hit counts,
and writes `<out>/prefix_cache.json` plus `<out>/prefix_cache.png`.

    python -m benchmarks.prefix_cache --out bench-results/prefix_cache     # default model
    python -m benchmarks.prefix_cache --quick --model <dir> --system-tokens 200 \\
        --vocab-high 300 --out /tmp/pc                                     # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.prefix_cache_report import comparison, write_chart
from pdserve.config import EMBEDDED_MODEL, PdserveConfig, parse_config

SCHEMA = "pdserve.bench.prefix_cache/1"
# One Generate call with a 1,000-token prompt takes seconds; allow for a loaded machine.
_CALL_TIMEOUT_S = 300.0
# The router may start before its first load poll saw the replicas ready.
_READY_TIMEOUT_S = 120.0
_READY_POLL_S = 0.5


def service_config(prefix_caching: bool, args: argparse.Namespace) -> PdserveConfig:
    replica = {"num_cpus": 1, "torch_threads": args.torch_threads}
    kv_cache = {"memory_mb": args.kv_cache_mb}
    return parse_config({
        "model": {"source": args.model, "dtype": args.dtype,
                  "max_context_tokens": args.system_tokens + args.suffix_tokens + 16},
        "ray": {"num_cpus": 4, "namespace": "pdserve-bench"},
        "prefill": {"replicas": 1, "resources": replica, "kv_cache": kv_cache,
                    "prefix_caching": prefix_caching},
        "decode": {"replicas": 1, "resources": replica, "kv_cache": kv_cache},
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0},
        "metrics": {"router_port": 0, "replica_port": 0},
        "limits": {"max_tokens": 16},
        "log_level": "WARNING",
    })


def token_ids(rng: random.Random, num_tokens: int, args: argparse.Namespace) -> list[int]:
    return [rng.randrange(args.vocab_low, args.vocab_high) for _ in range(num_tokens)]


def workload(args: argparse.Namespace) -> tuple[list[int], list[list[int]], list[int]]:
    """The shared system prompt, one prompt per request (cold first), and a warm-up prompt of
    the same length that shares nothing with them. Equal in both settings (seeded)."""
    rng = random.Random(args.seed)
    system = token_ids(rng, args.system_tokens, args)
    prompts = []
    for index in range(args.requests + 1):
        # Suffixes differ in their first token: no block past the system prompt is shared.
        first = args.vocab_low + index % (args.vocab_high - args.vocab_low)
        prompts.append(system + [first] + token_ids(rng, args.suffix_tokens - 1, args))
    warm_up = token_ids(rng, len(prompts[0]), args)
    return system, prompts, warm_up


def run_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Both services at once, the same requests sent one at a time, alternating between them
    (so a machine whose load drifts slows both alike); returns each setting's rows and hit
    counts, keyed "on" and "off"."""
    from pdserve.client import GenerationClient
    from pdserve.serve import Service

    _, prompts, warm_up = workload(args)
    names = {"on": True, "off": False}
    with contextlib.ExitStack() as stack:
        services = {
            name: stack.enter_context(Service(service_config(caching, args)))
            for name, caching in names.items()
        }
        clients = {
            name: stack.enter_context(GenerationClient(service.address, _CALL_TIMEOUT_S))
            for name, service in services.items()
        }
        for client in clients.values():
            wait_until_ready(client)
            measure(client, warm_up)  # first-pass costs of a fresh replica stay out of the rows
        before = {name: prefill_counts(service) for name, service in services.items()}
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for prompt in prompts:
            for name, client in clients.items():
                rows[name].append(measure(client, prompt))
        after = {name: prefill_counts(service) for name, service in services.items()}
    return {
        name: summarize(caching, rows[name], before[name], after[name])
        for name, caching in names.items()
    }


def summarize(
    prefix_caching: bool, rows: list[dict[str, float]], before: dict[str, int],
    after: dict[str, int],
) -> dict[str, Any]:
    num_prompt = after["total_prompt_tokens"] - before["total_prompt_tokens"]
    num_cached = after["total_cached_prompt_tokens"] - before["total_cached_prompt_tokens"]
    return {
        "prefix_caching": prefix_caching,
        "cold": rows[0],
        "warm": rows[1:],
        "median_warm": {key: statistics.median(row[key] for row in rows[1:]) for key in rows[0]},
        "num_prompt_tokens": num_prompt,
        "num_cached_prompt_tokens": num_cached,
        "hit_rate": num_cached / num_prompt if num_prompt else 0.0,
        "num_cached_blocks": after["num_cached_blocks"],
    }


def measure(client: Any, prompt: list[int]) -> dict[str, float]:
    from pdserve.client import collect

    # Two tokens: the first comes from prefill, the second proves the KV hand-off worked.
    result = collect(client.generate(prompt, max_tokens=2, ignore_eos=True))
    if result.final is None or len(result.token_ids) != 2:
        raise RuntimeError(f"a Generate stream ended early: {result.summary()}")
    timings = result.final.timings
    return {
        "client_ttft_s": result.ttft_s,
        "server_ttft_s": timings.time_to_first_token_s,
        "queue_s": timings.queue_s,
        "prefill_s": timings.prefill_s,
        "kv_transfer_s": timings.kv_transfer_s,
    }


def prefill_counts(service: Any) -> dict[str, int]:
    """The prefill replicas' prefix-cache counts, summed (from their load reports)."""
    import ray

    from pdserve.messages import LoadReport, decode

    keys = ("total_prompt_tokens", "total_cached_prompt_tokens", "num_cached_blocks")
    totals = dict.fromkeys(keys, 0)
    for actor in service.prefill_actors.values():
        report = decode(LoadReport, ray.get(actor.load.remote(), timeout=60))
        for key in keys:
            totals[key] += getattr(report, key)
    return totals


def wait_until_ready(client: Any) -> None:
    """Polls Info until both pools have a READY replica; raises TimeoutError after a bound."""
    from pdserve.v1 import pdserve_pb2

    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        info = client.info()
        pools = (info.prefill, info.decode)
        if all(any(r.state == pdserve_pb2.REPLICA_STATE_READY for r in p.replicas) for p in pools):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not ready after {_READY_TIMEOUT_S} s: {info}")
        time.sleep(_READY_POLL_S)  # polling interval of a bounded wait


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    import ray

    from pdserve.bench.machine import machine_facts

    machine = machine_facts()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
                 namespace="pdserve-bench")
    try:
        settings = run_settings(args)
    finally:
        if started_ray:
            ray.shutdown()
    machine["loadavg_end"] = list(os.getloadavg())
    summary = comparison(settings, args.target_speedup)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "command_line": ["python", "-m", "benchmarks.prefix_cache", *(argv or sys.argv[1:])],
        "options": {key: value for key, value in vars(args).items() if key != "out"},
        "machine": machine,
        "settings": settings,
        "comparison": summary,
    }
    (out_dir / "prefix_cache.json").write_text(json.dumps(results, indent=2) + "\n")
    write_chart(settings, args.system_tokens, out_dir / "prefix_cache.png")
    for line in summary["lines"]:
        print(line)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--suffix-tokens", type=int, default=24)
    parser.add_argument("--requests", type=int, default=8, help="warm requests per setting")
    parser.add_argument("--vocab-low", type=int, default=1000)
    parser.add_argument("--vocab-high", type=int, default=3000)
    parser.add_argument("--target-speedup", type=float, default=5.0,
                        help="the issue's target: warm TTFT off / on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 warm requests (smoke test)")
    parser.add_argument("--out", default="bench-results/prefix_cache")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.kv_cache_mb = 2, 32
    if args.suffix_tokens < 1 or args.requests < 1 or args.vocab_high <= args.vocab_low:
        parser.error("need --suffix-tokens >= 1, --requests >= 1, --vocab-high > --vocab-low")
    return args


if __name__ == "__main__":
    raise SystemExit(main())
