"""HTTP/gRPC ratios of the HTTP-overhead benchmark, and its chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.mixed_load_report import figure

# (name, figure path in a bench summary)
FIGURES = (
    ("TTFT p50", ("ttft_s", "p50")),
    ("ITL p50", ("itl_s", "p50")),
    ("ITL p99", ("itl_s", "p99")),
    ("tokens/s", ("output_token_throughput_per_s",)),
)
HTTP_BACKENDS = ("openai-completions", "openai-chat")


def comparison(summaries: dict[str, dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Per concurrency and figure: the gRPC figure, each HTTP backend's, and HTTP / gRPC."""
    rows, lines = [], []
    for concurrency in concurrencies:
        grpc = summaries.get(f"c{concurrency}/grpc", {})
        for name, path in FIGURES:
            base = figure(grpc, path)
            row: dict[str, Any] = {"concurrency": concurrency, "figure": name, "grpc": base}
            shown = [f"C={concurrency:<3d} {name:9s} grpc {_show(base)}"]
            for backend in HTTP_BACKENDS:
                value = figure(summaries.get(f"c{concurrency}/{backend}", {}), path)
                ratio = value / base if value is not None and base else None
                row[backend] = value
                row[f"{backend}/grpc"] = ratio
                shown.append(f"{backend} {_show(value)} ({_ratio(ratio)})")
            rows.append(row)
            lines.append("  ".join(shown))
    return {"rows": rows, "lines": lines}


def write_chart(results: dict[str, Any], path: Path) -> None:
    """One panel per figure: bars per concurrency, one per backend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    summaries = results["summaries"]
    concurrencies = results["settings"]["concurrency"]
    backends = ("grpc", *HTTP_BACKENDS)
    fig, axes = pyplot.subplots(1, len(FIGURES), figsize=(14, 3.6))
    width = 0.8 / len(backends)
    for axis, (name, figure_path) in zip(axes, FIGURES):
        for offset, backend in enumerate(backends):
            values = [
                figure(summaries.get(f"c{c}/{backend}", {}), figure_path) or 0.0
                for c in concurrencies
            ]
            positions = [i + (offset - 1) * width for i in range(len(concurrencies))]
            axis.bar(positions, values, width, label=backend)
        axis.set_xticks(range(len(concurrencies)), [f"C={c}" for c in concurrencies])
        axis.set_title(name)
        axis.set_ylabel("tokens/s" if name == "tokens/s" else "seconds")
    axes[0].legend(fontsize=8)
    cpu = results["machine"].get("cpu_model", "")
    fig.suptitle(f"Same service over gRPC and the OpenAI HTTP API ({cpu})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"
