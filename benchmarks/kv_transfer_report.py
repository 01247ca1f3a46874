"""Output of the KV transfer benchmark: the JSON of every raw figure, a two-panel PNG chart
and a compact stdout table. Pure functions of the results dict built by kv_transfer.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Order of the reference paths in the table and the chart.
BASELINES = ("raw_tcp", "memcpy", "grpc_bytes")


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


def table_lines(results: dict[str, Any]) -> list[str]:
    """One line per (size, path): GB/s and the ratios to raw TCP and to memcpy."""
    lines = [f"{'tokens':>7} {'MB':>7}  {'path':<12} {'GB/s':>6} {'/raw_tcp':>9} {'/memcpy':>8} "
             f"{'cpu ms':>7}"]
    for size in results["transfer"]:
        mb = size["num_bytes"] / 1e6
        for name, figures in _paths(size):
            if "gb_per_s" not in figures:
                lines.append(f"{size['num_tokens']:>7} {mb:>7.1f}  {name:<12} failed: "
                             f"{figures.get('error', '?')}")
                continue
            lines.append(
                f"{size['num_tokens']:>7} {mb:>7.1f}  {name:<12} {figures['gb_per_s']:>6.2f} "
                f"{figures['vs_raw_tcp']:>9.2f} {figures['vs_memcpy']:>8.2f} "
                f"{1e3 * cpu_s_per_transfer(figures):>7.1f}"
            )
    for name, reason in results["skipped_transports"].items():
        lines.append(f"skipped {name}: {reason}")
    service = results.get("service")
    if isinstance(service, dict):
        lines.append(f"Service, {service['num_prompt_tokens']}-token prompt, median of "
                     f"{service['num_requests']} (the first token streams from prefill):")
        for label, run in service_runs(service):
            if "error" in run:
                lines.append(f"  {label:<18} failed: {run['error']}")
                continue
            lines.append(
                f"  {label:<18} prefill {run['median_prefill_s']:.3f} s  exposed hand-off "
                f"{run['median_kv_transfer_s']:.3f} s "
                f"({100 * run['median_kv_transfer_over_prefill']:.1f}% of prefill)  "
                f"TTFT {run['median_time_to_first_token_s']:.3f} s  2nd token after "
                f"{run['median_client_second_token_gap_s']:.3f} s"
            )
    elif service is not None:
        lines.append(f"service part: {service}")
    return lines


def failures(results: dict[str, Any]) -> list[str]:
    """What failed in a run (transports per size, service runs), for the exit status."""
    found = [
        f"{name} at {size['num_tokens']} tokens: {figures['error']}"
        for size in results["transfer"] for name, figures in size["transports"].items()
        if "error" in figures
    ]
    service = results.get("service")
    if isinstance(service, dict):
        found += [f"service {label}: {run['error']}"
                  for label, run in service_runs(service) if "error" in run]
    return found


def cpu_s_per_transfer(figures: dict[str, Any]) -> float:
    """CPU seconds of every process taking part, per transfer: robust to a busy machine,
    unlike wall time."""
    return sum(role["cpu_s_per_transfer"] for role in figures["usage"].values())


def service_runs(service: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """("grpc, pipelined", figures), ... in run order; "auto" names what it resolved to."""
    runs = []
    for transport, by_mode in service["runs"].items():
        for key, label in (("pipelining_on", "pipelined"), ("pipelining_off", "after pass")):
            run = by_mode[key]
            served = run.get("kv_transport", transport)
            name = transport if served == transport else f"{transport}={served}"
            runs.append((f"{name}, {label}", run))
    return runs


def _paths(size: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    baselines = [(name, size["baselines"][name]) for name in BASELINES if name in size["baselines"]]
    return baselines + list(size["transports"].items())


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Left: GB/s per path per prompt size. Right: prefill vs exposed hand-off time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 2))
    _throughput_panel(left, results["transfer"])
    _service_panel(right, results.get("service"))
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _throughput_panel(axes: Any, sizes: list[dict[str, Any]]) -> None:
    names = [name for name, _ in _paths(sizes[0])] if sizes else []
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        values = [size_figure(size, name) for size in sizes]
        positions = [i + (index - (len(names) - 1) / 2) * width for i in range(len(sizes))]
        bars = axes.bar(positions, values, width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    axes.set_xticks(range(len(sizes)))
    axes.set_xticklabels([f"{s['num_tokens']} tok\n{s['num_bytes'] / 1e6:.0f} MB" for s in sizes])
    axes.set_ylabel("GB/s (payload bytes / median wall time)")
    axes.set_title("KV of SmolLM2-135M (fp32) moved between two processes", fontsize=9)
    axes.legend(fontsize=7)


def size_figure(size: dict[str, Any], name: str) -> float:
    figures = size["baselines"].get(name) or size["transports"].get(name) or {}
    return float(figures.get("gb_per_s", 0.0))


def _service_panel(axes: Any, service: Any) -> None:
    if not isinstance(service, dict):
        axes.text(0.5, 0.5, "service part not run", ha="center", va="center")
        axes.set_axis_off()
        return
    runs = [(label, run) for label, run in service_runs(service) if "error" not in run]
    if not runs:
        axes.text(0.5, 0.5, "every service run failed", ha="center", va="center")
        axes.set_axis_off()
        return
    positions = list(range(len(runs)))
    prefill = [run["median_prefill_s"] for _, run in runs]
    exposed = [run["median_kv_transfer_s"] for _, run in runs]
    axes.bar(positions, prefill, 0.6, label="prefill pass")
    bars = axes.bar(positions, exposed, 0.6, bottom=prefill, label="exposed KV hand-off")
    labels = [f"+{100 * run['median_kv_transfer_over_prefill']:.1f}%" for _, run in runs]
    axes.bar_label(bars, labels=labels, fontsize=7)
    axes.set_xticks(positions)
    axes.set_xticklabels([label.replace(", ", "\n") for label, _ in runs], fontsize=7)
    axes.set_ylabel("seconds (median)")
    axes.set_title(f"{service['num_prompt_tokens']}-token prompt: prefill and exposed hand-off",
                   fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
