"""Ratios of the mixed-load benchmark against the issue's targets, and its chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Disaggregated vs colocated targets: (name, figure, how the ratio is read, bound).
TARGETS = (
    ("p99 ITL", ("itl_s", "p99"), "at most", 1 / 3),
    ("p50 TTFT", ("ttft_s", "p50"), "at most", 1.3),
    ("goodput", ("goodput_per_s",), "at least", 2.0),
)


def figure(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def comparison(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per target: both figures, disaggregated / colocated and whether the bound is met
    (n/a when a run measured one mode only)."""
    rows, lines = [], []
    for name, path, sense, bound in TARGETS:
        ours = figure(summaries.get("disaggregated", {}), path)
        theirs = figure(summaries.get("colocated", {}), path)
        ratio = ours / theirs if ours is not None and theirs else None
        met = None if ratio is None else (ratio <= bound if sense == "at most" else ratio >= bound)
        rows.append({"target": name, "disaggregated": ours, "colocated": theirs,
                     "ratio": ratio, "bound": f"{sense} {bound:.2f}", "met": met})
        shown = "n/a" if ratio is None else f"{ratio:.2f}"
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[met]
        lines.append(f"{name:9s} disaggregated {_show(ours)}  colocated {_show(theirs)}  "
                     f"ratio {shown} (target {sense} {bound:.2f}) {verdict}")
    return {"rows": rows, "lines": lines}


def write_chart(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Three panels (p99 ITL, p50 TTFT, goodput), one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    modes = list(summaries)
    fig, axes = pyplot.subplots(1, len(TARGETS), figsize=(11, 3.6))
    for axis, (name, figure_path, _, _) in zip(axes, TARGETS):
        values = [figure(summaries[mode], figure_path) or 0.0 for mode in modes]
        axis.bar(modes, values, color=["tab:blue", "tab:orange"])
        unit = "requests/s" if name == "goodput" else "seconds"
        axis.set_title(name)
        axis.set_ylabel(unit)
    fig.suptitle("Mixed load: disaggregated vs colocated (same model, threads, load)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
