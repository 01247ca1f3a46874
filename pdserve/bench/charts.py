"""PNG charts of a run: latency CDFs, and every inter-token gap over wall time with the long
prompts' arrivals marked (what a long prefill does to the running streams).

matplotlib is imported here only, with the non-interactive Agg backend, when charts are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.records import RequestRecord
from pdserve.bench.workload import ordered_kinds

CDF_FILE = "latency_cdf.png"
ITL_OVER_TIME_FILE = "itl_over_time.png"
_KIND_COLOURS = {"main": "tab:blue", "long": "tab:orange"}


def write_charts(
    out_dir: Path,
    records: Sequence[RequestRecord],
    long_arrivals_s: Sequence[float],
    target: str = "",
) -> list[Path]:
    """Draws both charts into `out_dir` from the OK records, each titled with `target` (the
    backend, URL and model); returns their paths. Blocks on drawing and file I/O (a second or
    two); raises OSError if a file cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    ok = [record for record in records if record.ok]
    paths = [out_dir / CDF_FILE, out_dir / ITL_OVER_TIME_FILE]
    _draw_cdfs(pyplot, ok, paths[0], target)
    _draw_itl_over_time(pyplot, ok, long_arrivals_s, paths[1], target)
    return paths


def _draw_cdfs(pyplot: Any, records: Sequence[RequestRecord], path: Path, target: str) -> None:
    panels = (
        ("TTFT", lambda r: [r.ttft_s] if r.ttft_s is not None else []),
        ("inter-token gap", lambda r: r.itl_gaps_s()),
        ("end-to-end", lambda r: [r.e2e_s]),
    )
    figure, axes = pyplot.subplots(1, len(panels), figsize=(15, 4.5))
    for ax, (title, values_of) in zip(axes, panels):
        for kind in ordered_kinds({record.kind for record in records}):
            values = sorted(v for r in records if r.kind == kind for v in values_of(r))
            if values:
                # Starts at 0 at the smallest value; after the i-th value, (i + 1) / n are <= x.
                fractions = [0.0] + [(i + 1) / len(values) for i in range(len(values))]
                ax.step(
                    [values[0] * 1000] + [v * 1000 for v in values],
                    fractions,
                    where="post",
                    color=_KIND_COLOURS.get(kind),
                    label=f"{kind} (n={len(values)})",
                )
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction ≤ x")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if target:
        figure.suptitle(target)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _draw_itl_over_time(
    pyplot: Any,
    records: Sequence[RequestRecord],
    long_arrivals_s: Sequence[float],
    path: Path,
    target: str,
) -> None:
    figure, ax = pyplot.subplots(figsize=(13, 4.5))
    for kind in ordered_kinds({record.kind for record in records}):
        times = [t for r in records if r.kind == kind for t in r.gap_end_times_s()]
        gaps = [g * 1000 for r in records if r.kind == kind for g in r.itl_gaps_s()]
        ax.scatter(
            times, gaps, s=4, alpha=0.6, color=_KIND_COLOURS.get(kind), label=f"{kind} streams"
        )
    for index, at_s in enumerate(long_arrivals_s):
        ax.axvline(
            at_s,
            color="tab:red",
            linewidth=0.8,
            linestyle="--",
            label="long prompt sent" if index == 0 else None,
        )
    title = "inter-token gaps over time"
    ax.set_title(f"{title} — {target}" if target else title)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("gap (ms)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
