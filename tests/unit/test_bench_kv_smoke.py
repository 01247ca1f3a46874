"""Smoke test of the KV transfer benchmark: `--quick` runs end to end (every transport that can
run here, both baselines, the gRPC step profile) and writes a complete JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kvtransfer

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BYTES_PER_TOKEN = 46_080  # SmolLM2-135M in fp32: 30 layers x 2 x 3 heads x 64 dims x 4 bytes


def _run_quick(out: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.kv_transfer", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((out / "kv_transfer.json").read_text())


def _assert_positive_path(figures: dict, name: str) -> None:
    assert "error" not in figures, f"{name}: {figures.get('error')}"
    assert len(figures["times_s"]) == 1, name
    assert figures["median_s"] > 0, name
    assert figures["gb_per_s"] > 0, name
    assert figures["vs_raw_tcp"] > 0 and figures["vs_memcpy"] > 0, name


def test_quick_run_writes_every_figure_and_a_png(tmp_path: Path) -> None:
    results = _run_quick(tmp_path)

    machine = results["machine"]
    assert machine["cpu_count"] >= 1
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert machine["versions"]["grpcio"] and machine["date"]

    [size] = results["transfer"]
    assert size["num_tokens"] == 128
    assert size["num_bytes"] == 128 * BYTES_PER_TOKEN
    for name in ("raw_tcp", "memcpy", "grpc_bytes"):
        _assert_positive_path(size["baselines"][name], name)
    assert size["baselines"]["raw_tcp"]["vs_raw_tcp"] == 1.0
    assert size["baselines"]["memcpy"]["vs_memcpy"] == 1.0
    # Every transport was either measured (and its bytes verified) or skipped with a reason.
    measured, skipped = set(size["transports"]), set(results["skipped_transports"])
    assert measured | skipped == set(kvtransfer.TRANSPORTS)
    assert "grpc" in measured and "inproc" in measured
    for name in measured:
        _assert_positive_path(size["transports"][name], name)
        assert size["transports"][name]["usage"], name

    [profile] = results["grpc_profile"]
    assert profile["num_chunks"] >= 1
    assert profile["sender_total"]["gb_per_s"] > 0 and profile["receiver_total"]["gb_per_s"] > 0
    assert isinstance(results["service"], str)  # --quick skips the service part

    png = (tmp_path / "kv_transfer.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
