"""The prefix-cache benchmark's comparison (caching off / on) and its chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Figures compared between the settings: (key in a row, what it is).
FIGURES = (
    ("client_ttft_s", "TTFT seen by the client"),
    ("server_ttft_s", "TTFT measured by the router"),
    ("prefill_s", "prefill pass"),
)


def comparison(settings: dict[str, dict[str, Any]], target_speedup: float) -> dict[str, Any]:
    """Speed-up of the warm requests' medians (off / on) per figure, whether the client TTFT
    meets `target_speedup`, and printable lines."""
    on, off = settings["on"]["median_warm"], settings["off"]["median_warm"]
    speedups = {key: _ratio(off[key], on[key]) for key, _ in FIGURES}
    lines = [
        f"{label}: off {off[key] * 1e3:.1f} ms, on {on[key] * 1e3:.1f} ms, "
        f"{_times(speedups[key])}" for key, label in FIGURES
    ]
    lines.append(
        f"hit rate with caching on: {100 * settings['on']['hit_rate']:.1f}% of prompt tokens "
        f"(off: {100 * settings['off']['hit_rate']:.1f}%)"
    )
    client_speedup = speedups["client_ttft_s"]
    meets = client_speedup is not None and client_speedup >= target_speedup
    lines.append(f"target >= {target_speedup:g}x client TTFT: {'met' if meets else 'NOT met'}")
    return {"speedup": speedups, "target_speedup": target_speedup, "meets_target": meets,
            "lines": lines}


def write_chart(settings: dict[str, dict[str, Any]], system_tokens: int, path: Path) -> None:
    """Left: median warm TTFT and prefill time per setting. Right: every request's client
    TTFT in order (request 0 is the cold one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, name in ((-width / 2, "off"), (width / 2, "on")):
        medians = settings[name]["median_warm"]
        values = [medians[key] * 1e3 for key, _ in FIGURES]
        bars = left.bar([i + offset for i in range(len(FIGURES))], values, width,
                        label=f"prefix caching {name}")
        left.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    left.set_xticks(range(len(FIGURES)))
    left.set_xticklabels([label for _, label in FIGURES], fontsize=8)
    left.set_ylabel("ms (median of warm requests)")
    left.set_title(f"{system_tokens}-token shared system prompt", fontsize=9)
    left.legend(fontsize=7)
    for name in ("off", "on"):
        rows = [settings[name]["cold"], *settings[name]["warm"]]
        right.plot([row["client_ttft_s"] * 1e3 for row in rows], marker="o",
                   label=f"prefix caching {name}")
    right.set_xlabel("request (0 = cold: computes the system prompt)")
    right.set_ylabel("client TTFT, ms")
    right.set_yscale("log")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _ratio(numerator: float, denominator: float) -> float | None:
    """None when the denominator is not positive (JSON has no infinity)."""
    return numerator / denominator if denominator > 0 else None


def _times(speedup: float | None) -> str:
    return "n/a" if speedup is None else f"{speedup:.1f}x"
