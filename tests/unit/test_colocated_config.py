"""`mode: colocated` and its pool section: defaults, bounds, and the shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.config import load_config, parse_config
from pdserve.errors import ConfigError

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


def test_the_shipped_config_describes_a_colocated_pool_of_the_same_cores() -> None:
    config = load_config(LOCAL)
    assert config.mode == "disaggregated"
    pool = config.colocated
    both = config.prefill.resources.num_cpus + config.decode.resources.num_cpus
    assert pool.replicas * pool.resources.num_cpus == both
    assert pool.max_prefill_tokens_per_step == 512


def test_colocated_mode_and_its_section_parse() -> None:
    config = parse_config(
        {
            "mode": "colocated",
            "colocated": {
                "replicas": 3, "max_batch_size": 8, "max_prefill_tokens_per_step": 64,
                "kv_cache": {"block_size": 32, "memory_mb": 16},
                "resources": {"torch_threads": 2},
            },
        }
    )
    pool = config.colocated
    assert (config.mode, pool.replicas, pool.max_batch_size) == ("colocated", 3, 8)
    assert pool.max_prefill_tokens_per_step == 64
    assert (pool.kv_cache.block_size, pool.kv_cache.memory_mb) == (32, 16)
    assert pool.resources.torch_threads == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mode": "split"}, "mode: Input should be 'disaggregated' or 'colocated'"),
        ({"colocated": {"max_prefill_tokens_per_step": 0}}, "max_prefill_tokens_per_step"),
        ({"colocated": {"replicas": 0}}, "colocated.replicas"),
        ({"colocated": {"chunk": 1}}, "colocated.chunk: unknown key; valid keys: kv_cache, "
         "max_batch_size, max_prefill_tokens_per_step, replicas, resources"),
    ],
)
def test_bad_values_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, origin="test.yaml")
    assert message in str(info.value)
