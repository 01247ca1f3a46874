"""Smoke test of the capacity benchmark: both reservation policies on the default config (the
embedded model, whose chat template the prompts need) in one call, then its JSON and chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import capacity

pytestmark = pytest.mark.smollm2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_capacity_quick_run(ray_cluster, tmp_path: Path) -> None:
    out = tmp_path / "capacity"
    assert capacity.main(["--quick", "--out", str(out)]) == 0

    results = json.loads((out / "capacity.json").read_text())
    assert results["schema"] == capacity.SCHEMA
    assert set(results["policies"]) == set(capacity.POLICIES)
    for policy, runs in results["policies"].items():
        assert set(runs) == {"2", "4"}, policy
        for concurrency, summary in runs.items():
            assert summary["num_ok"] == summary["num_requests"] == int(concurrency), summary
            assert summary["output_tokens"] > 0 and summary["ttft_s"]["p50"] > 0
    assert [t["concurrency"] for t in results["targets"]] == [2, 4]
    assert all(t["on_demand_refused"] == 0 for t in results["targets"])
    assert (out / "capacity.png").read_bytes().startswith(PNG_SIGNATURE)
