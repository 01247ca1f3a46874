"""The load generator `pdserve bench serve`: drives a running router over gRPC, or any
OpenAI-compatible HTTP server (`--backend openai-chat|openai-completions`, see
`pdserve.bench.backends`), and reports TTFT, inter-token gaps, TPOT, end-to-end latency,
throughput and goodput.

The CLI adds the flags with `add_serve_arguments`, builds `BenchOptions` with
`options_from_args` and calls `run_serve_bench`; tests may build `BenchOptions` directly.
"""

from __future__ import annotations

from typing import Any

from pdserve.bench.arguments import add_serve_arguments, options_from_args, options_to_argv
from pdserve.bench.options import BenchOptions

__all__ = [
    "BenchOptions",
    "add_serve_arguments",
    "options_from_args",
    "options_to_argv",
    "run_serve_bench",
]


def run_serve_bench(options: BenchOptions) -> dict[str, Any]:
    """Runs one benchmark; see `pdserve.bench.serve_bench.run_serve_bench`."""
    # Imported on use: the runner, tqdm and grpc.aio are not needed to build the CLI parser.
    from pdserve.bench.serve_bench import run_serve_bench as run

    return run(options)
