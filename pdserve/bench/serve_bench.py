"""`pdserve bench serve` end to end: set up the workload, drive the server, report.

`run_serve_bench` is what the CLI calls (and what tests call in-process). It asks the backend
for the server's facts first (the router's `Info`, or the OpenAI `/models` listing), so a
workload that cannot fit the server's context fails before any request is sent; a server that
does not say its context limit gets no such check.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from pdserve.bench.arguments import options_to_argv
from pdserve.bench.backends import open_backend
from pdserve.bench.charts import write_charts
from pdserve.bench.lengths import LengthDistribution
from pdserve.bench.machine import machine_facts
from pdserve.bench.options import BenchOptions
from pdserve.bench.progress import ProgressBar
from pdserve.bench.report import format_summary, write_results_json
from pdserve.bench.runner import LoadRunner, RunOutcome
from pdserve.bench.sharegpt import Conversation, load_sharegpt
from pdserve.bench.stats import Slo, summarize
from pdserve.bench.workload import LONG, MAIN, ShareGPTWorkload, SyntheticWorkload, Workload
from pdserve.errors import InvalidArgument

RESULTS_FILE = "results.json"
ShareGPTFile = tuple[list[Conversation], int]  # usable conversations, entries skipped
SCHEMA = "pdserve.bench.serve/1"


def run_serve_bench(options: BenchOptions) -> dict[str, Any]:
    """Runs the benchmark, writes results.json and the charts into `options.out_dir` (when
    set), prints the summary table to stdout and returns the results.

    Blocks for the whole run. Raises InvalidArgument for a workload the server cannot take
    or an unreadable ShareGPT/CA/tokenizer file, grpc.RpcError when `Info` fails (server
    unreachable, bad token), PdserveError when `/models` fails (openai-* without --model).
    Failed requests are recorded, not raised.
    """
    machine = machine_facts()
    sharegpt = load_sharegpt(options.sharegpt_file) if options.sharegpt_file else None
    server, target, workload, outcome = asyncio.run(_drive(options, sharegpt))
    machine["loadavg_end"] = list(os.getloadavg())
    summary = summarize(outcome.records, outcome.elapsed_s, _slo(options))
    results = {
        "schema": SCHEMA,
        "command_line": options_to_argv(options),
        "options": options.to_dict(),
        "machine": machine,
        "target": target,
        "server": server,
        "workload": workload,
        "started_unix_s": outcome.started_unix_s,
        "summary": summary,
        "long_arrivals_s": outcome.long_arrivals_s,
        "requests": [record.to_dict() for record in outcome.records],
    }
    if options.out_dir is not None:
        out_dir = Path(options.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_results_json(out_dir / RESULTS_FILE, results)
        write_charts(out_dir, outcome.records, outcome.long_arrivals_s, _title(target))
    print(f"target      {_title(target)}", flush=True)
    print(format_summary(summary, _describe_arrivals(options)), flush=True)
    if options.out_dir is not None:
        print(f"results     {Path(options.out_dir) / RESULTS_FILE} (+ PNG charts)", flush=True)
    return results


async def _drive(
    options: BenchOptions, sharegpt: ShareGPTFile | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], RunOutcome]:
    """Runs the load; returns the server's facts, the target, the workload and the outcome."""
    async with open_backend(options) as backend:
        server = await backend.describe()
        main, long, workload = _workloads(options, sharegpt, server["max_context_tokens"])
        target = {
            "backend": options.backend,
            "url": options.target_url,
            "model": server["model"],
            **backend.request_form,
        }
        progress = ProgressBar(options.max_main_requests, options.progress)
        runner = LoadRunner(backend, options, main, long, on_done=progress.update)
        try:
            outcome = await runner.run()
        finally:
            progress.close()
    return server, target, workload, outcome


def _workloads(
    options: BenchOptions, sharegpt: ShareGPTFile | None, max_context_tokens: int | None
) -> tuple[Workload, Workload | None, dict[str, Any]]:
    """The main and (with the mix) long-prompt workloads, checked against the server's
    context limit (None: unknown, not checked), and a description of the main one for
    results.json."""
    main: Workload
    if sharegpt is not None:
        conversations, num_skipped = sharegpt
        main = ShareGPTWorkload(
            conversations,
            seed=options.seed,
            max_context_tokens=sys.maxsize if max_context_tokens is None else max_context_tokens,
            max_output_tokens=options.sharegpt_max_output_tokens,
        )
        facts = {
            "source": "sharegpt",
            "num_conversations_used": len(main.conversations),
            "num_entries_skipped": num_skipped,  # no human turn answered by a gpt turn
            "num_conversations_too_long": main.num_dropped,
        }
    else:
        main = _synthetic(options, options.prompt_len, options.output_len, MAIN)
        _check_fits(main, max_context_tokens, "--prompt-len")
        facts = {"source": "synthetic"}
    if not options.mix:
        return main, None, facts
    long_prompt = LengthDistribution("fixed", options.long_prompt_len, options.long_prompt_len)
    long = _synthetic(options, long_prompt, options.long_output, LONG)
    _check_fits(long, max_context_tokens, "--long-prompt-len")
    return main, long, facts


def _synthetic(
    options: BenchOptions, prompt: LengthDistribution, output: LengthDistribution, kind: str
) -> SyntheticWorkload:
    return SyntheticWorkload(
        prompt,
        output,
        vocab_low=options.vocab_low,
        vocab_high=options.vocab_high,
        seed=options.seed,
        kind=kind,
    )


def _check_fits(workload: SyntheticWorkload, max_context_tokens: int | None, flag: str) -> None:
    if max_context_tokens is not None and workload.max_context_tokens > max_context_tokens:
        raise InvalidArgument(
            flag,
            f"prompt up to {workload.prompt_len.max_tokens} + output up to "
            f"{workload.output_len.max_tokens} tokens exceeds the server's max_context_tokens "
            f"{max_context_tokens}",
        )


def _slo(options: BenchOptions) -> Slo:
    return Slo(ttft_s=options.slo_ttft_s, itl_p99_s=options.slo_itl_p99_s)


def _title(target: dict[str, Any]) -> str:
    """The run's target in one line, for the summary and the chart titles."""
    return f"{target['backend']} {target['url']} (model {target['model']})"


def _describe_arrivals(options: BenchOptions) -> str:
    if options.concurrency is not None:
        text = f"closed loop, concurrency {options.concurrency}"
    else:
        text = f"Poisson {options.rate_per_s:g} req/s"
    if options.mix:
        text += f", + {options.long_prompt_len}-token prompt every {options.long_every_s:g} s"
    return text
