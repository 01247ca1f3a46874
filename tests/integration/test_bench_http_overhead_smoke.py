"""Smoke test of the HTTP-overhead benchmark on the embedded model (it has a chat template):
gRPC, completions and chat run against one service in one call, then the comparison JSON and
the chart are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import http_overhead

pytestmark = pytest.mark.smollm2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_http_overhead_quick_run(ray_cluster, tmp_path: Path) -> None:
    out = tmp_path / "http"
    assert http_overhead.main(["--quick", "--out", str(out)]) == 0

    results = json.loads((out / "http_overhead.json").read_text())
    assert results["schema"] == http_overhead.SCHEMA
    assert results["machine"]["cpu_model"]
    assert set(results["summaries"]) == {
        f"c{c}/{backend}" for c in (1, 2) for backend in http_overhead.BACKENDS
    }
    for key, summary in results["summaries"].items():
        assert summary["num_ok"] == summary["num_requests"] >= 2, (key, summary["failures"])
    for row in results["comparison"]["rows"]:
        for backend in ("openai-completions", "openai-chat"):
            assert row[f"{backend}/grpc"] == pytest.approx(row[backend] / row["grpc"])
    assert (out / "http_overhead.png").read_bytes().startswith(PNG_SIGNATURE)
