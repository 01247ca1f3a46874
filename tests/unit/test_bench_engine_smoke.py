"""Smoke test of the engine decode benchmark: `--quick` on the tiny model runs every side end
to end and writes a complete JSON (figures, ratios, greedy agreement) and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.factories.model import build_tiny_model_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_STREAMS = 4


def _tiny_weight_bytes(vocab_size: int) -> int:
    """fp32 bytes one decode step reads from the factory's tiny Llama (untied embeddings, so
    the input embedding is not counted): 3 layers, hidden 64, MLP 128, 4 heads / 2 KV heads
    of 16 dims."""
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64
    mlp = 3 * 64 * 128
    norms = 2 * 64
    return 4 * (3 * (attention + mlp + norms) + 64 + vocab_size * 64)


@dataclass(frozen=True)
class QuickRun:
    document: dict
    model_dir: Path
    out: Path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("bench") / "engine_decode.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_decode", "--quick", "--threads", "1",
         "--model", str(model_dir), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "target >= 1.5x" in completed.stdout
    return QuickRun(json.loads(out.read_text()), model_dir, out)


def test_quick_run_measures_every_side(quick_run: QuickRun) -> None:
    document = quick_run.document
    settings = document["settings"]
    assert settings["quick"] and settings["threads"] == 1
    assert settings["num_streams"] == QUICK_STREAMS and settings["repeats"] == 1
    [dtype] = document["results"]
    assert dtype == "float32"
    result = document["results"][dtype]
    runs = result["runs"]
    for key in ("hf_static_batch", "pdserve_batch", "hf_static_single", "pdserve_single"):
        assert runs[key]["decode_tok_s"]["median"] > 0, key
        assert runs[key]["e2e_tok_s"]["median"] > 0, key
    assert runs["pdserve_batch"]["num_streams"] == QUICK_STREAMS
    assert runs["pdserve_single"]["num_streams"] == 1
    for key in ("hf_static_batch", "pdserve_batch"):
        step_ms = runs[key]["step_ms"]
        assert 0 < step_ms["best"] <= step_ms["median"], key
        # Decode tokens/s is every stream's token per median step.
        assert runs[key]["decode_tok_s"]["median"] == pytest.approx(
            1000 * QUICK_STREAMS / step_ms["median"]
        ), key
    continuous = runs["hf_continuous_batch"]
    assert continuous.get("error") or continuous["e2e_tok_s"]["median"] > 0
    vocab_size = json.loads((quick_run.model_dir / "config.json").read_text())["vocab_size"]
    assert result["weight_bytes_per_step"] == _tiny_weight_bytes(vocab_size)
    assert result["copy_gb_per_s"] > 0
    assert result["roofline_single_tok_s"] == pytest.approx(
        result["copy_gb_per_s"] * 1e9 / result["weight_bytes_per_step"]
    )


def test_quick_run_ratios_follow_from_the_figures(quick_run: QuickRun) -> None:
    document = quick_run.document
    result = document["results"]["float32"]
    runs, ratios = result["runs"], result["ratios"]
    assert ratios["batch_decode_vs_hf_static"] == pytest.approx(
        runs["pdserve_batch"]["decode_tok_s"]["median"]
        / runs["hf_static_batch"]["decode_tok_s"]["median"]
    )
    assert ratios["single_decode_vs_roofline"] == pytest.approx(
        runs["pdserve_single"]["decode_tok_s"]["median"] / result["roofline_single_tok_s"]
    )
    assert ratios["batch_decode_vs_hf_static_e2e"] == pytest.approx(
        runs["pdserve_batch"]["decode_tok_s"]["median"]
        / runs["hf_static_batch"]["e2e_tok_s"]["median"]
    )
    assert result["targets_met"]["batch_decode_vs_hf_static"] == (
        ratios["batch_decode_vs_hf_static"] >= document["targets"]["batch_decode_vs_hf_static"]
    )


def test_quick_run_greedy_tokens_equal_transformers(quick_run: QuickRun) -> None:
    assert quick_run.document["results"]["float32"]["streams_equal"] == {
        "batch": QUICK_STREAMS, "single": 1
    }


def test_quick_run_records_the_machine_and_a_png(quick_run: QuickRun) -> None:
    machine = quick_run.document["machine"]
    assert machine["start"]["cpu_count"] >= 1 and machine["end"]["versions"]["torch"]
    assert quick_run.out.with_suffix(".png").read_bytes().startswith(PNG_SIGNATURE)
