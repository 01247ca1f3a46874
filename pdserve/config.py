"""The one config tree: YAML loaded once into frozen, validated, typed models.

`load_config(path)` is the only reader of the YAML. Unknown keys and bad values raise
`ConfigError` naming the key path (e.g. `decode.kv_cache.block_size`) and, for enumerations,
the valid choices. Cross-section checks run at load. Nothing else in pdserve reads
environment variables for settings, except `RAY_ADDRESS` (and the client-side `PDSERVE_TOKEN`)
which the CLI reads and passes in explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from pdserve.config_sections import (  # noqa: F401 - re-exported: the config's public face
    EMBEDDED_MODEL,
    ConfigSection,
    FaultsConfig,
    KVTransferConfig,
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    RayConfig,
    ReliabilityConfig,
    RouterConfig,
    SecurityConfig,
    TimeoutsConfig,
)
from pdserve.errors import ConfigError
from pdserve.pool_config import (  # noqa: F401 - re-exported: the config's public face
    ColocatedPoolConfig,
    DecodeKVCacheConfig,
    DecodePoolConfig,
    KVCacheConfig,
    PrefillPoolConfig,
    ResourcesConfig,
)


class PdserveConfig(ConfigSection):
    """The whole config tree."""

    model: ModelConfig = ModelConfig()
    # disaggregated: prefill and decode pools with KV hand-off; colocated: the `colocated`
    # pool alone (each replica prefills and decodes; `prefill` and `decode` are ignored).
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    ray: RayConfig = RayConfig()
    prefill: PrefillPoolConfig = PrefillPoolConfig()
    decode: DecodePoolConfig = DecodePoolConfig()
    colocated: ColocatedPoolConfig = ColocatedPoolConfig()
    kv_transfer: KVTransferConfig = KVTransferConfig()
    router: RouterConfig = RouterConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    reliability: ReliabilityConfig = ReliabilityConfig()
    faults: FaultsConfig = FaultsConfig()
    security: SecurityConfig = SecurityConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _cross_checks(self) -> PdserveConfig:
        if self.limits.max_tokens >= self.model.max_context_tokens:
            raise ValueError(
                f"limits.max_tokens ({self.limits.max_tokens}) must be below "
                f"model.max_context_tokens ({self.model.max_context_tokens})"
            )
        self._check_router_ports()
        return self

    def _check_router_ports(self) -> None:
        """The router's listeners share its host: two fixed ports must differ (0 = free)."""
        ports = {"router.port": self.router.port, "router.http_port": self.router.http_port}
        if self.metrics.enabled:
            ports["metrics.router_port"] = self.metrics.router_port
        seen: dict[int, str] = {}
        for key, port in ports.items():
            if not port:
                continue
            if port in seen:
                raise ValueError(f"{key} and {seen[port]} are both {port}: the router binds both")
            seen[port] = key

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for shipping to replicas as msgpack)."""
        return self.model_dump(mode="python")


def parse_config(raw: Any, origin: str = "<config>") -> PdserveConfig:
    """Validates already-parsed YAML/msgpack data into the config tree."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return PdserveConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def load_config(path: str | Path) -> PdserveConfig:
    """Reads and validates one YAML file. Raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, origin=str(path))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _describe(exc: ValidationError, origin: str) -> str:
    lines = [_describe_one(err) for err in exc.errors()]
    return f"{origin}: invalid config\n  " + "\n  ".join(lines)


def _describe_one(err: Any) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(part) for part in loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(_section_keys(loc[:-1]))
        return f"{key}: unknown key; valid keys: {valid}"
    if err["type"] == "value_error":
        # Our validators write messages that already name the full key paths.
        return str(err["ctx"]["error"])
    if err["type"] in ("model_type", "dict_type"):
        valid = ", ".join(_section_keys(loc))
        return f"{key}: expected a mapping with keys {valid}, got {_show(err['input'])}"
    return f"{key}: {err['msg']} (got {_show(err['input'])})"


def _section_keys(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section at `loc` (empty if `loc` is not a section)."""
    section: type[BaseModel] = PdserveConfig
    for part in loc:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return sorted(section.model_fields)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
