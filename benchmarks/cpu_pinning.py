"""Step-time jitter of co-located replica processes, pinned (`resources.pin_cpus`) or not.

Starts `--processes` worker processes at once, each with one torch thread running a
decode-step-like loop (the fp32 linears of `--layers` SmolLM2-135M layers for one token:
[1,576] x qkv [576,960], o [576,576], gate+up [576,3072], down [1536,576]) for `--seconds`,
all unpinned, then each pinned with `pdserve.cpu_pinning.pin_process`, alternating for
`--rounds`. Prints JSON with each mode's per-step p50/p99/max in milliseconds, pooled over the
processes and rounds.

    .venv/bin/python -m benchmarks.cpu_pinning --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_HIDDEN = 576
_SHAPES = [(_HIDDEN, 960), (_HIDDEN, _HIDDEN), (_HIDDEN, 3072), (1536, _HIDDEN)]
_WARMUP_STEPS = 20


def worker(args: argparse.Namespace) -> None:
    """One process: pins itself if asked, warms up, prints `ready`, waits for a line on stdin,
    then steps for `args.seconds` and prints its step times (ms) as JSON."""
    from pdserve.cpu_pinning import pin_process

    cpu_ids = pin_process(1, f"bench-{args.index}", args.lock_dir).cpu_ids if args.pin else ()
    import torch

    torch.set_num_threads(1)
    weights = [torch.randn(*shape) * 0.02 for _ in range(args.layers) for shape in _SHAPES]

    def step() -> None:
        x = torch.randn(1, _HIDDEN)
        for i in range(0, len(weights), len(_SHAPES)):
            qkv, o, gate_up, down = weights[i:i + len(_SHAPES)]
            x = x + (x @ qkv)[:, :_HIDDEN] @ o
            x = x + (x @ gate_up)[:, :1536] @ down

    for _ in range(_WARMUP_STEPS):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    times_ms = []
    end = time.perf_counter() + args.seconds
    while (start := time.perf_counter()) < end:
        step()
        times_ms.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"cpu_ids": list(cpu_ids), "times_ms": times_ms}), flush=True)


def run_mode(args: argparse.Namespace, pin: bool, lock_dir: str) -> list[dict[str, Any]]:
    """Starts the workers together; returns each one's result."""
    command = [sys.executable, "-m", "benchmarks.cpu_pinning", "--worker",
               "--seconds", str(args.seconds), "--layers", str(args.layers),
               "--lock-dir", lock_dir, *(["--pin"] if pin else [])]
    workers = [
        subprocess.Popen([*command, "--index", str(i)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for i in range(args.processes)
    ]
    for process in workers:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    for process in workers:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    return [json.loads(process.communicate()[0]) for process in workers]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Step times pooled over the processes and rounds of one mode, in ms."""
    times = sorted(t for result in results for t in result["times_ms"])
    return {
        "pinned_cpu_ids": sorted({tuple(result["cpu_ids"]) for result in results}),
        "steps": len(times),
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[int(0.99 * (len(times) - 1))], 3),
        "max_ms": round(times[-1], 3),
        "mean_ms": round(statistics.fmean(times), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=3, help="alternating the modes")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lock-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, list[dict[str, Any]]] = {"unpinned": [], "pinned": []}
    # A private lock dir: the benchmark must not take cores from real replicas' accounting.
    with tempfile.TemporaryDirectory() as lock_dir:
        for _ in range(args.rounds):  # alternating, so background load hits both modes
            for mode in results:
                results[mode] += run_mode(args, mode == "pinned", lock_dir)
    report: dict[str, Any] = {
        "processes": args.processes, "rounds": args.rounds, "seconds": args.seconds,
        "layers": args.layers, **{mode: summarise(found) for mode, found in results.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
