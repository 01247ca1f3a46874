"""Smoke test of the prefix-cache benchmark on the tiny model: `--quick` runs both settings
end to end in-process (in the session's Ray) and writes a complete JSON and a PNG. Timings
are not asserted (a loaded machine distorts them); the hit counts are exact."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import prefix_cache

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYSTEM_TOKENS = 200
SUFFIX_TOKENS = 8
BLOCK_SIZE = 16  # the config default the benchmark keeps


def test_quick_run_writes_both_settings_and_a_png(
    ray_cluster: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    argv = [
        "--quick", "--model", str(tiny_model_dir), "--system-tokens", str(SYSTEM_TOKENS),
        "--suffix-tokens", str(SUFFIX_TOKENS), "--vocab-low", "3", "--vocab-high", "300",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert prefix_cache.main(argv) == 0
    results = json.loads((tmp_path / "prefix_cache.json").read_text())
    assert results["schema"] == prefix_cache.SCHEMA
    assert results["machine"]["cpu_count"] >= 1 and len(results["machine"]["loadavg_end"]) == 3
    on, off = results["settings"]["on"], results["settings"]["off"]
    num_requests = 3  # --quick: one cold + two warm
    num_prompt_tokens = num_requests * (SYSTEM_TOKENS + SUFFIX_TOKENS)
    for setting in (on, off):
        assert len(setting["warm"]) == num_requests - 1
        assert setting["num_prompt_tokens"] == num_prompt_tokens
        for row in [setting["cold"], *setting["warm"]]:
            assert row["prefill_s"] > 0 and row["client_ttft_s"] > 0, row
    shared = SYSTEM_TOKENS // BLOCK_SIZE * BLOCK_SIZE
    assert on["num_cached_prompt_tokens"] == (num_requests - 1) * shared
    assert on["hit_rate"] == on["num_cached_prompt_tokens"] / num_prompt_tokens
    assert on["num_cached_blocks"] > 0
    assert off["num_cached_prompt_tokens"] == 0 and off["num_cached_blocks"] == 0
    comparison = results["comparison"]
    assert set(comparison["speedup"]) == {"client_ttft_s", "server_ttft_s", "prefill_s"}
    assert all(value > 0 for value in comparison["speedup"].values())
    assert isinstance(comparison["meets_target"], bool) and comparison["lines"]
    png = (tmp_path / "prefix_cache.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
