"""results.json and the compact summary table printed at the end of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

_METRICS = (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s"))
_COLUMNS = ("p50", "p90", "p99", "mean", "max")


def write_results_json(path: Path, results: dict[str, Any]) -> None:
    """Writes `results` as indented JSON (blocks on file I/O; raises OSError)."""
    path.write_text(json.dumps(_finite(results), indent=1) + "\n", encoding="utf-8")


def format_summary(summary: dict[str, Any], arrivals: str) -> str:
    """The summary table: counts, throughput, goodput, latency percentiles in ms (per request
    kind when the mix ran) and failures by status."""
    lines = [
        f"requests    {summary['num_requests']} sent, {summary['num_ok']} ok, "
        f"{summary['num_failed']} failed in {summary['elapsed_s']:.2f} s ({arrivals})",
        f"throughput  {summary['request_throughput_per_s']:.2f} req/s, "
        f"{summary['output_token_throughput_per_s']:.1f} output tok/s",
        f"goodput     {summary['goodput_per_s']:.2f} req/s ({summary['num_slo_met']}/"
        f"{summary['num_requests']} ok within SLO: {_format_slo(summary['slo'])})",
        f"{'latency ms':<14}" + "".join(f"{column:>9}" for column in _COLUMNS) + f"{'n':>7}",
    ]
    by_kind = summary["by_kind"]
    groups = (
        [(f" {kind}", by_kind[kind]) for kind in by_kind] if len(by_kind) > 1 else [("", summary)]
    )
    for suffix, figures in groups:
        for label, key in _METRICS:
            lines.append(_latency_row(f"{label}{suffix}", figures[key]))
    for status, failure in summary["failures"].items():
        lines.append(f"failed      {status} x{failure['count']}: {failure['example'][:120]}")
    return "\n".join(lines)


def _latency_row(label: str, figures: dict[str, Any]) -> str:
    cells = "".join(
        f"{figures[column] * 1000:>9.1f}" if figures[column] is not None else f"{'-':>9}"
        for column in _COLUMNS
    )
    return f"{label:<14}{cells}{figures['count']:>7}"


def _format_slo(slo: dict[str, Any]) -> str:
    bounds = []
    if slo["ttft_s"] is not None:
        bounds.append(f"TTFT <= {slo['ttft_s'] * 1000:g} ms")
    if slo["itl_p99_s"] is not None:
        bounds.append(f"own ITL p99 <= {slo['itl_p99_s'] * 1000:g} ms")
    return ", ".join(bounds) if bounds else "none set"


def _finite(value: Any) -> Any:
    """Infinite floats as the string "inf": plain JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
