"""Smoke test of the mixed-load benchmark on the tiny model: both modes run in one call on the
session's Ray cluster, then the comparison JSON and the chart are checked."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import mixed_load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_mixed_load_quick_run(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    argv = ["--quick", "--model", str(tiny_model_dir), "--vocab-low", "3", "--vocab-high", "300",
            "--slo-ttft", "30", "--slo-itl-p99", "30", "--out", str(out)]
    assert mixed_load.main(argv) == 0

    results = json.loads((out / "mixed_load.json").read_text())
    assert results["schema"] == mixed_load.SCHEMA
    assert set(results["modes"]) == set(mixed_load.MODES)
    for mode, summary in results["modes"].items():
        assert summary["num_ok"] >= 1, (mode, summary["failures"])
        assert summary["num_failed"] == 0, (mode, summary["failures"])
        assert summary["by_kind"]["long"]["num_ok"] >= 1, mode
        server = json.loads((out / mode / "results.json").read_text())["server"]
        assert server["mode"] == mode
    rows = {row["target"]: row for row in results["comparison"]["rows"]}
    assert set(rows) == {"p99 ITL", "p50 TTFT", "goodput"}
    itl = rows["p99 ITL"]
    assert itl["ratio"] == itl["disaggregated"] / itl["colocated"]
    assert (out / "mixed_load.png").read_bytes().startswith(PNG_SIGNATURE)
