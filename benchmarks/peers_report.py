"""The peers benchmark's results: per-run metrics from `pdserve bench serve`'s results.json, the
summary JSON, a markdown table and a PNG chart (when matplotlib is installed).

A run is one server x dtype x concurrency. Its metrics come from the load generator's summary:
output tokens/s (the servers' `usage.completion_tokens` over the measured window, so a server
that stops at EOS despite `ignore_eos` is charged only for what it produced), TTFT and
inter-chunk gap (ITL) percentiles, and the ITL p99/p50 ratio (how uneven the decode steps are).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "pdserve.benchmarks.peers/1"
_TABLE_COLUMNS = (
    ("server", "server"),
    ("dtype", "dtype"),
    ("C", "concurrency"),
    ("tok/s", "output_tok_per_s"),
    ("TTFT p50 ms", "ttft_p50_ms"),
    ("TTFT p99 ms", "ttft_p99_ms"),
    ("ITL p50 ms", "itl_p50_ms"),
    ("ITL p99 ms", "itl_p99_ms"),
    ("ITL p99/p50", "itl_p99_over_p50"),
    ("ok/failed", "ok_failed"),
    ("out tok/req", "mean_output_tokens"),
    ("prompt tok/req", "mean_prompt_tokens"),
)


def run_metrics(bench_results: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run, from the load generator's results.json (as a dict)."""
    summary = bench_results["summary"]
    ok = [r for r in bench_results.get("requests", []) if r.get("status") == "OK"]
    ttft, itl = summary["ttft_s"], summary["itl_s"]
    return {
        "output_tok_per_s": summary["output_token_throughput_per_s"],
        "request_per_s": summary["request_throughput_per_s"],
        "elapsed_s": summary["elapsed_s"],
        "ttft_p50_s": ttft["p50"],
        "ttft_p99_s": ttft["p99"],
        "itl_p50_s": itl["p50"],
        "itl_p99_s": itl["p99"],
        "itl_p99_over_p50": _ratio(itl["p99"], itl["p50"]),
        "ttft_p99_over_p50": _ratio(ttft["p99"], ttft["p50"]),
        "num_ok": summary["num_ok"],
        "num_failed": summary["num_failed"],
        "failures": summary["failures"],
        "num_output_tokens": summary["num_output_tokens"],
        "mean_output_tokens": _mean(r["num_completion_tokens"] for r in ok),
        "mean_prompt_tokens": _mean(
            r["num_prompt_tokens"] for r in ok if r.get("num_prompt_tokens") is not None
        ),
        "num_tokens_sources": sorted({r.get("num_tokens_source", "") for r in ok}),
    }


def table_rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run that produced metrics, for the table (latencies in ms)."""
    rows = []
    for run in runs:
        metrics = run.get("metrics")
        if not metrics:
            continue
        row = {
            "server": run["server"],
            "dtype": run["dtype"],
            "concurrency": run["concurrency"],
            "output_tok_per_s": metrics["output_tok_per_s"],
            "itl_p99_over_p50": metrics["itl_p99_over_p50"],
            "ok_failed": f"{metrics['num_ok']}/{metrics['num_failed']}",
            "mean_output_tokens": metrics["mean_output_tokens"],
            "mean_prompt_tokens": metrics["mean_prompt_tokens"],
        }
        for name in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
            seconds = metrics[f"{name}_s"]
            row[f"{name}_ms"] = None if seconds is None else seconds * 1000
        rows.append(row)
    return rows


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    """A markdown table of every run, then a line per run that failed to produce metrics or
    had failed requests (by status, with an example)."""
    lines = [
        "| " + " | ".join(title for title, _ in _TABLE_COLUMNS) + " |",
        "|"
        + "|".join("---" if key in ("server", "dtype") else "---:" for _, key in _TABLE_COLUMNS)
        + "|",
    ]
    for row in table_rows(runs):
        lines.append("| " + " | ".join(_cell(row[key]) for _, key in _TABLE_COLUMNS) + " |")
    for run in runs:
        name = f"{run['server']} {run['dtype']} C={run['concurrency']}"
        if run.get("error"):
            lines.append(f"\n{name}: FAILED: {run['error']}")
        failures = (run.get("metrics") or {}).get("failures", {})
        for status, failure in failures.items():
            lines.append(f"\n{name}: {failure['count']} x {status}: {failure['example'][:200]}")
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Writes the summary JSON (creating its folder); infinities become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(results), indent=1) + "\n", encoding="utf-8")


def write_chart(path: Path, runs: Sequence[dict[str, Any]], title: str) -> Path | None:
    """Output tok/s against concurrency, one line per server (and dtype, when several ran).
    Returns the PNG's path, or None when matplotlib is not installed or nothing succeeded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = chart_series(runs)
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        axes.plot([c for c, _ in points], [t for _, t in points], marker="o", label=label)
    levels = sorted({c for points in series.values() for c, _ in points})
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(level) for level in levels])
    axes.set_xlabel("concurrent requests")
    axes.set_ylabel("output tokens/s")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def chart_series(runs: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(concurrency, tok/s) points per line label, sorted by concurrency."""
    rows = table_rows(runs)
    several_dtypes = len({row["dtype"] for row in rows}) > 1
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        label = f"{row['server']} {row['dtype']}" if several_dtypes else row["server"]
        series.setdefault(label, []).append((row["concurrency"], row["output_tok_per_s"]))
    return {label: sorted(points) for label, points in series.items()}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
