"""Configs for tests: small KV budgets, port 0, one thread per replica."""

from __future__ import annotations

from typing import Any

from pdserve.config import PdserveConfig, parse_config


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(model_source: str, **overrides: Any) -> PdserveConfig:
    """A config serving `model_source` on 127.0.0.1 with a free port; `overrides` nest."""
    base: dict[str, Any] = {
        "model": {"source": model_source, "dtype": "float32", "max_context_tokens": 512},
        "prefill": {"replicas": 1, "resources": {"num_cpus": 1}, "kv_cache": {"memory_mb": 64}},
        "decode": {"replicas": 1, "resources": {"num_cpus": 1}, "kv_cache": {"memory_mb": 64}},
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0},
        # Free ports: several services may run in one test session.
        "metrics": {"router_port": 0, "replica_port": 0},
        "limits": {"max_tokens": 128},
        "timeouts": {"load_poll_interval_s": 0.2},
    }
    return parse_config(_merge(base, overrides))
