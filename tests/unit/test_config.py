"""The config tree: shipped configs load; every mistake names its key and the valid choices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pdserve.config import PdserveConfig, load_config, parse_config
from pdserve.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLES = sorted((CONFIGS / "examples").glob("*.yaml"))


def _error(raw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, origin="test.yaml")
    return str(info.value)


def _key_paths(section: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= _key_paths(annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def _raw_paths(raw: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for name, value in raw.items():
        if isinstance(value, dict) and value:  # an empty mapping ({}) is a value
            paths |= _raw_paths(value, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def test_local_config_is_the_embedded_default() -> None:
    config = load_config(CONFIGS / "local.yaml")
    assert config.model.source == "embedded:smollm2-135m-instruct"
    assert config.model.dtype == "float32"
    assert (config.prefill.replicas, config.decode.replicas) == (1, 1)
    for pool in (config.prefill, config.decode):
        assert pool.resources.num_cpus == 1
        assert pool.resources.torch_threads == 1
    assert (config.router.host, config.router.port) == ("127.0.0.1", 50051)


def test_local_config_writes_out_every_key() -> None:
    raw = yaml.safe_load((CONFIGS / "local.yaml").read_text())
    assert _raw_paths(raw) == _key_paths(PdserveConfig)


def test_local_config_keeps_defaults_except_where_local() -> None:
    """The reference file must not drift from the code's defaults unnoticed."""
    loaded = load_config(CONFIGS / "local.yaml").to_dict()
    defaults = PdserveConfig().to_dict()
    differing = {
        path for path in _key_paths(PdserveConfig) if _get(loaded, path) != _get(defaults, path)
    }
    assert differing == {"ray.num_cpus"}


def _get(tree: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    load_config(path)


def test_multinode_example() -> None:
    config = load_config(CONFIGS / "examples" / "multinode.yaml")
    assert config.ray.address == "auto"
    assert (config.prefill.replicas, config.decode.replicas) == (2, 4)
    assert config.kv_transfer.host == "auto"
    assert config.router.host == "0.0.0.0"
    assert config.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("raw", "key", "valid"),
    [
        (
            {"modle": {}},
            "modle",
            "colocated, decode, faults, kv_transfer, limits, log_level, metrics, mode, model",
        ),
        (
            {"decode": {"replica": 2}},
            "decode.replica",
            "autoscale, kv_cache, max_batch_size, replicas",
        ),
        (
            {"prefill": {"resources": {"gpus": 1}}},
            "prefill.resources.gpus",
            "custom_resources, node_labels, num_cpus, num_gpus, pin_cpus, placement_strategy, "
            "torch_threads",
        ),
        (
            {"decode": {"kv_cache": {"blocks": 1}}},
            "decode.kv_cache.blocks",
            "block_size, memory_mb",
        ),
    ],
)
def test_unknown_key_names_path_and_valid_keys(raw: Any, key: str, valid: str) -> None:
    message = _error(raw)
    assert f"{key}: unknown key; valid keys: {valid}" in message
    assert message.startswith("test.yaml:")


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({"model": {"dtype": "float16"}}, "model.dtype", "'float32' or 'bfloat16'"),
        ({"log_level": "TRACE"}, "log_level", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ({"router": {"port": "50051"}}, "router.port", "valid integer"),
        ({"router": {"port": 70000}}, "router.port", "less than or equal to 65535"),
        ({"decode": {"replicas": 0}}, "decode.replicas", "greater than or equal to 1"),
        ({"prefill": {"lease_ttl_s": 0}}, "prefill.lease_ttl_s", "greater than 0"),
        ({"ray": {"num_cpus": True}}, "ray.num_cpus", "valid integer"),
        ({"kv_transfer": {"host": ""}}, "kv_transfer.host", "at least 1 character"),
        ({"decode": [1, 2]}, "decode", "expected a mapping with keys autoscale, kv_cache"),
        ({"decode": None}, "decode", "got null"),
    ],
)
def test_bad_value_names_the_key(raw: Any, key: str, hint: str) -> None:
    message = _error(raw)
    line = next(line.strip() for line in message.splitlines() if line.strip().startswith(key))
    assert hint in line


def test_every_error_is_reported_at_once() -> None:
    message = _error({"model": {"dtype": "x"}, "router": {"port": -1}})
    assert "model.dtype" in message and "router.port" in message


def test_max_tokens_must_fit_the_context() -> None:
    raw = {"model": {"max_context_tokens": 512}, "limits": {"max_tokens": 512}}
    message = _error(raw)
    assert "limits.max_tokens (512) must be below model.max_context_tokens (512)" in message
    fits = parse_config({"model": {"max_context_tokens": 512}, "limits": {"max_tokens": 511}})
    assert fits.limits.max_tokens == 511


def test_chunk_must_fit_the_message() -> None:
    message = _error({"kv_transfer": {"chunk_bytes": 32 * 1024 * 1024}})
    assert "kv_transfer.chunk_bytes" in message and "kv_transfer.max_message_bytes" in message


def test_default_deadline_within_max() -> None:
    message = _error({"timeouts": {"default_deadline_s": 10.0, "max_deadline_s": 5.0}})
    assert "timeouts.default_deadline_s" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- decode\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("decode:\n  replicas: 2\ndecode:\n  replicas: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'decode'"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml: No such file"):
        load_config(tmp_path / "nope.yaml")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"model:\n  source: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == PdserveConfig()


def test_config_is_frozen() -> None:
    config = parse_config({})
    with pytest.raises(Exception, match="frozen"):
        config.router.port = 1  # type: ignore[misc]


def test_security_is_off_by_default() -> None:
    security = parse_config({}).security
    assert security.api_tokens_file is None
    assert (security.tls_cert_file, security.tls_key_file) == (None, None)


def test_security_paths_load() -> None:
    raw = {
        "security": {
            "api_tokens_file": "/etc/pdserve/tokens",
            "tls_cert_file": "/etc/pdserve/tls.crt",
            "tls_key_file": "/etc/pdserve/tls.key",
        }
    }
    security = parse_config(raw).security
    assert security.api_tokens_file == "/etc/pdserve/tokens"
    assert (security.tls_cert_file, security.tls_key_file) == (
        "/etc/pdserve/tls.crt",
        "/etc/pdserve/tls.key",
    )


@pytest.mark.parametrize("given", ["tls_cert_file", "tls_key_file"])
def test_tls_needs_both_files_and_names_both_keys(given: str) -> None:
    message = _error({"security": {given: "/etc/pdserve/tls.pem"}})
    assert "security.tls_cert_file and security.tls_key_file must be set together" in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"security": {"api_tokens": "/x"}}, "security.api_tokens: unknown key; valid keys: "
         "api_tokens_file, tls_cert_file, tls_key_file"),
        ({"security": {"api_tokens_file": ""}}, "security.api_tokens_file"),
        ({"security": {"api_tokens_file": 7}}, "security.api_tokens_file"),
        ({"security": {"tls_cert_file": "", "tls_key_file": "/k"}}, "security.tls_cert_file"),
    ],
)
def test_bad_security_values_name_the_key(raw: Any, key: str) -> None:
    assert key in _error(raw)


def test_router_listeners_need_distinct_ports() -> None:
    with pytest.raises(ConfigError, match="router.http_port and router.port are both 9000"):
        parse_config({"router": {"port": 9000, "http_port": 9000}})
    with pytest.raises(ConfigError, match="metrics.router_port and router.http_port"):
        parse_config({"router": {"http_port": 9400}})
    parse_config({"router": {"port": 0, "http_port": 0}, "metrics": {"router_port": 0}})
    assert parse_config({"router": {"http_port": None}}).router.http_port is None
