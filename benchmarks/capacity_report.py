"""Summaries of the capacity benchmark's runs, the targets, and its chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.capacity_driver import LoopRun

REFUSED = "RESOURCE_EXHAUSTED"


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def summarize(run: LoopRun) -> dict[str, Any]:
    records, elapsed_s = run.records, run.elapsed_s
    ok = [r for r in records if r.status == "OK"]
    failures: dict[str, int] = {}
    for record in records:
        if record.status not in ("OK", REFUSED):
            failures[record.status] = failures.get(record.status, 0) + 1
    output_tokens = sum(r.num_completion_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_refused": sum(1 for r in records if r.status == REFUSED),
        "num_failed": sum(failures.values()),
        "failures": failures,
        "elapsed_s": elapsed_s,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "steady_s": run.dispatch_done_s,
        "steady_output_tokens_per_s": _steady_tokens_per_s(run),
        "mean_completion_tokens": output_tokens / len(ok) if ok else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl_s]),
        "queue_s": percentiles([r.queue_s for r in ok]),
        "num_preemptions": sum(r.num_preemptions for r in ok),
        "num_preempted_requests": sum(1 for r in ok if r.num_preemptions),
    }


def _steady_tokens_per_s(run: LoopRun) -> float:
    """Output tokens/s until the last request was sent (every worker busy): the capacity at
    this concurrency, without the tail in which the longest answers finish nearly alone."""
    window_s = run.dispatch_done_s
    if window_s <= 0:
        return 0.0
    tokens = sum(
        count
        for record in run.records
        for at, count in zip(record.token_times_s, record.token_counts)
        if at <= window_s
    )
    return tokens / window_s


def targets(policies: dict[str, dict[str, Any]], concurrency: str) -> dict[str, Any]:
    """The issue's targets at `concurrency`: 0 refused with on_demand, and on_demand's output
    tokens/s at least 2x full's, over the whole run and over its steady part."""
    on_demand = policies.get("on_demand", {}).get(concurrency)
    full = policies.get("full", {}).get(concurrency)
    refused = on_demand["num_refused"] if on_demand else None
    ratios = {
        key: on_demand[key] / full[key] if on_demand and full and full[key] else None
        for key in ("output_tokens_per_s", "steady_output_tokens_per_s")
    }
    whole, steady = ratios["output_tokens_per_s"], ratios["steady_output_tokens_per_s"]
    return {
        "concurrency": int(concurrency),
        "on_demand_refused": refused,
        "zero_refused_met": None if refused is None else refused == 0,
        "tokens_per_s_ratio": whole,
        "tokens_per_s_2x_met": None if whole is None else whole >= 2.0,
        "steady_tokens_per_s_ratio": steady,
        "steady_tokens_per_s_2x_met": None if steady is None else steady >= 2.0,
    }


def write_chart(results: dict[str, Any], path: Path) -> None:
    """One panel per figure (tokens/s, TTFT p50, ITL p99, queue p50), a group of bars per
    concurrency, one bar per policy; a figure a run did not record is left out."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    policies = results["policies"]
    concurrencies = sorted({c for runs in policies.values() for c in runs}, key=int)
    panels = [
        (title, keys) for title, keys in _PANELS
        if any(_has(runs[c], keys) for runs in policies.values() for c in runs)
    ]
    fig, axes = pyplot.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    width = 0.8 / max(1, len(policies))
    for axis, (title, keys) in zip(axes[0], panels):
        for offset, (policy, runs) in enumerate(policies.items()):
            positions = [i + offset * width for i in range(len(concurrencies))]
            values = [_get(runs[c], keys) if c in runs else 0.0 for c in concurrencies]
            bars = axis.bar(positions, values, width, label=policy)
            axis.bar_label(bars, fmt="%.3g", fontsize=7)
        axis.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(concurrencies))])
        axis.set_xticklabels(concurrencies)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("concurrent chats")
    axes[0][0].legend(fontsize=8)
    cpu = results["machine"].get("cpu_model", "")
    fig.suptitle(f"Decode KV reservation: on demand vs worst case, real chats ({cpu})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


_PANELS = (
    ("output tokens/s (steady part)", ("steady_output_tokens_per_s",)),
    ("output tokens/s (whole run)", ("output_tokens_per_s",)),
    ("TTFT p50 (s)", ("ttft_s", "p50")),
    ("ITL p99 (s)", ("itl_s", "p99")),
    ("router + prefill queue p50 (s)", ("queue_s", "p50")),
)


def _has(summary: dict[str, Any], keys: tuple[str, ...]) -> bool:
    value: Any = summary
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return isinstance(value, (int, float))


def _get(summary: dict[str, Any], keys: tuple[str, ...]) -> float:
    value: Any = summary
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0
