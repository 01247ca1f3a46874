"""Summaries, ratios against the targets, the printed table, the JSON and the bar chart of the
engine decode benchmark."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# pdserve decode with N streams vs transformers' static-batch generate() with N streams.
TARGET_BATCH_VS_GENERATE = 1.5
# pdserve batch-1 decode vs the memory-bandwidth roofline.
TARGET_SINGLE_VS_ROOFLINE = 0.8

# Runs, in chart order: key -> label.
RUN_LABELS = {
    "hf_static_batch": "transformers generate(), static batch",
    "hf_continuous_batch": "transformers generate_batch()",
    "pdserve_batch": "pdserve engine, concurrent streams",
    "pdserve_torch_batch": "pdserve engine on torch's kernels, streams",
    "hf_static_single": "transformers generate(), batch 1",
    "pdserve_single": "pdserve engine, batch 1",
    "pdserve_torch_single": "pdserve engine on torch's kernels, batch 1",
}


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "best": max(values), "all": values}


def summarize_runs(runs: list[dict[str, Any]], num_new_tokens: int) -> dict[str, Any]:
    """Tokens/s of repeated runs of one kind. Decode: every stream's token per step, from the
    median (and fastest) step over all runs: a step hit by a neighbour's burst on a shared
    machine moves a median much less than a total. End to end: every new token over prefill +
    decode, per run."""
    num_streams = runs[0]["num_streams"]
    summary: dict[str, Any] = {"num_streams": num_streams}
    if "step_s" in runs[0]:
        steps = [step for run in runs for step in run["step_s"]]
        summary["decode_tok_s"] = {
            "median": num_streams / statistics.median(steps),
            "best": num_streams / min(steps),
            "per_run": [num_streams * len(r["step_s"]) / sum(r["step_s"]) for r in runs],
        }
        summary["step_ms"] = {"median": 1000 * statistics.median(steps), "best": 1000 * min(steps)}
        summary["prefill_s"] = [r["prefill_s"] for r in runs]
    summary["e2e_tok_s"] = spread([num_streams * num_new_tokens / r["total_s"] for r in runs])
    summary["total_s"] = [r["total_s"] for r in runs]
    return summary


def streams_equal(pdserve_runs: list[dict[str, Any]], hf_runs: list[dict[str, Any]]) -> int:
    """Streams whose greedy tokens are identical in pdserve's and transformers' first runs."""
    return sum(a == b for a, b in zip(pdserve_runs[0]["token_ids"], hf_runs[0]["token_ids"]))


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Medians over medians. The first and `single_decode_vs_roofline` are the targets; the
    others put them in context (the repo's baselines quote `generate()` end to end)."""
    runs = result["runs"]
    roofline = result["roofline_single_tok_s"]
    pd_decode = _median(runs, "pdserve_batch", "decode_tok_s")
    pd_single = _median(runs, "pdserve_single", "decode_tok_s")
    out = {
        "batch_decode_vs_hf_static": pd_decode / _median(runs, "hf_static_batch", "decode_tok_s"),
        "batch_decode_vs_hf_static_e2e": pd_decode / _median(runs, "hf_static_batch", "e2e_tok_s"),
        "batch_e2e_vs_hf_static": _median(runs, "pdserve_batch", "e2e_tok_s")
        / _median(runs, "hf_static_batch", "e2e_tok_s"),
        "single_decode_vs_roofline": pd_single / roofline,
        "hf_single_decode_vs_roofline": _median(runs, "hf_static_single", "decode_tok_s")
        / roofline,
        "single_decode_vs_hf_static": pd_single / _median(runs, "hf_static_single", "decode_tok_s"),
    }
    if "decode_tok_s" in runs.get("pdserve_torch_single", {}):
        out["single_decode_vs_torch_kernels"] = pd_single / _median(
            runs, "pdserve_torch_single", "decode_tok_s"
        )
        out["batch_decode_vs_torch_kernels"] = pd_decode / _median(
            runs, "pdserve_torch_batch", "decode_tok_s"
        )
    if "e2e_tok_s" in runs.get("hf_continuous_batch", {}):
        out["batch_e2e_vs_hf_continuous"] = _median(runs, "pdserve_batch", "e2e_tok_s") / _median(
            runs, "hf_continuous_batch", "e2e_tok_s"
        )
    return out


def targets_met(result_ratios: dict[str, float]) -> dict[str, bool]:
    return {
        "batch_decode_vs_hf_static": result_ratios["batch_decode_vs_hf_static"]
        >= TARGET_BATCH_VS_GENERATE,
        "single_decode_vs_roofline": result_ratios["single_decode_vs_roofline"]
        >= TARGET_SINGLE_VS_ROOFLINE,
    }


def _median(runs: dict[str, Any], key: str, figure: str) -> float:
    return float(runs[key][figure]["median"])


def table_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for dtype, result in results.items():
        lines.append(f"== {dtype}: weights {result['weight_bytes_per_step'] / 1e6:.0f} MB/step, "
                     f"copy bandwidth {result['copy_gb_per_s']:.2f} GB/s, "
                     f"batch-1 roofline {result['roofline_single_tok_s']:.1f} tok/s")
        for key, label in RUN_LABELS.items():
            run = result["runs"].get(key, {})
            if "error" in run:
                lines.append(f"  {label:40s} not run: {run['error']}")
                continue
            decode = run.get("decode_tok_s", {}).get("median")
            decode_text = f"{decode:8.1f}" if decode is not None else "       -"
            lines.append(f"  {label:40s} decode {decode_text} tok/s   "
                         f"end to end {run['e2e_tok_s']['median']:8.1f} tok/s")
        result_ratios, met = result["ratios"], result["targets_met"]
        num_streams = result["runs"]["pdserve_batch"]["num_streams"]
        lines.append(
            f"  pdserve / generate() with {num_streams} streams, decode: "
            f"{result_ratios['batch_decode_vs_hf_static']:.2f}x (target >= "
            f"{TARGET_BATCH_VS_GENERATE}x: {_verdict(met['batch_decode_vs_hf_static'])}); "
            f"vs generate() end to end: {result_ratios['batch_decode_vs_hf_static_e2e']:.2f}x"
        )
        lines.append(
            f"  pdserve batch 1 / roofline: {result_ratios['single_decode_vs_roofline']:.0%} "
            f"(target >= {TARGET_SINGLE_VS_ROOFLINE:.0%}: "
            f"{_verdict(met['single_decode_vs_roofline'])}); transformers batch 1: "
            f"{result_ratios['hf_single_decode_vs_roofline']:.0%}"
        )
        lines.append(
            f"  greedy tokens equal to generate(): {result['streams_equal']['batch']}/"
            f"{num_streams} streams, batch 1: {result['streams_equal']['single']}/1"
        )
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_chart(path: Path, results: dict[str, Any]) -> None:
    """One panel per dtype: decode tokens/s of every run (generate_batch() end to end: it
    cannot be split), plus the batch-1 roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(9, 3.6 * len(results)), squeeze=False
    )
    for axis, (dtype, result) in zip(axes[:, 0], results.items()):
        labels, values, colors = [], [], []
        for key, label in RUN_LABELS.items():
            run = result["runs"].get(key, {})
            figure = run.get("decode_tok_s") or run.get("e2e_tok_s")
            if figure is None:
                continue
            labels.append(label + ("" if "decode_tok_s" in run else " (end to end)"))
            values.append(figure["median"])
            colors.append(
                "tab:olive" if key.startswith("pdserve_torch")
                else "tab:green" if key.startswith("pdserve") else "tab:blue"
            )
        labels.append("roofline, batch 1 (weight bytes / copy bandwidth)")
        values.append(result["roofline_single_tok_s"])
        colors.append("tab:gray")
        positions = list(range(len(values)))[::-1]  # first run on top
        axis.barh(positions, values, color=colors)
        axis.set_yticks(positions, labels, fontsize=8)
        axis.set_xlabel("decode tokens/s (streams / median step)")
        result_ratios = result["ratios"]
        axis.set_title(
            f"{dtype}: pdserve {result_ratios['batch_decode_vs_hf_static']:.2f}x generate() "
            f"with {result['runs']['pdserve_batch']['num_streams']} streams; batch 1 at "
            f"{result_ratios['single_decode_vs_roofline']:.0%} of the roofline",
            fontsize=9,
        )
        for position, value in zip(positions, values):
            axis.annotate(f" {value:.0f}", (value, position), va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
