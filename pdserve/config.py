"""The one config tree: YAML loaded once into frozen, validated, typed models.

`load_config(path)` is the only reader of the YAML. Unknown keys and bad values raise
`ConfigError` naming the key path (e.g. `decode.kv_cache.block_size`) and, for enumerations,
the valid choices. Cross-section checks run at load. Nothing else in pdserve reads
environment variables for settings, except `RAY_ADDRESS` which the CLI passes in explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdserve.errors import ConfigError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(_Section):
    """Which model both pools serve."""

    # A local folder, a hub id, or the embedded default `embedded:smollm2-135m-instruct`.
    source: str = EMBEDDED_MODEL
    # Weights, activations and KV cache dtype.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Largest prompt + max_tokens a request may ask for (also capped by the model's own limit).
    max_context_tokens: int = Field(default=2048, ge=16, le=1_048_576)
    # Where the embedded model is converted to; None = the user cache dir (~/.cache/pdserve).
    cache_dir: str | None = None


class ResourcesConfig(_Section):
    """Resources of one replica (one Ray actor)."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    # torch intra-op threads inside the replica.
    torch_threads: int = Field(default=1, ge=1, le=1024)


class KVCacheConfig(_Section):
    """The paged KV cache of one replica."""

    # Tokens per block.
    block_size: int = Field(default=16, ge=1, le=1024)
    # Memory for the cache tensor, in MiB; sets the number of blocks.
    memory_mb: int = Field(default=256, ge=1)


class PrefillPoolConfig(_Section):
    replicas: int = Field(default=1, ge=1, le=1024)
    resources: ResourcesConfig = ResourcesConfig()
    kv_cache: KVCacheConfig = KVCacheConfig()
    # Largest number of prompt tokens in one batched forward pass.
    max_batch_tokens: int = Field(default=4096, ge=16)
    # Largest number of prompts in one batched forward pass.
    max_batch_size: int = Field(default=16, ge=1)
    # How long finished KV waits for the decode side before it is freed.
    lease_ttl_s: float = Field(default=30.0, gt=0)


class DecodePoolConfig(_Section):
    replicas: int = Field(default=1, ge=1, le=1024)
    resources: ResourcesConfig = ResourcesConfig()
    kv_cache: KVCacheConfig = KVCacheConfig(memory_mb=512)
    # Largest number of sequences in one decode step.
    max_batch_size: int = Field(default=64, ge=1)


class KVTransferConfig(_Section):
    """How KV moves from a prefill to a decode replica."""

    transport: Literal["grpc"] = "grpc"
    # Interface the decode replicas' KV servers bind to. "auto" = the node's Ray IP.
    host: str = "127.0.0.1"
    # Target payload bytes per chunk (a chunk never exceeds max_message_bytes).
    chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    # Largest gRPC message either side accepts.
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=65536)
    # A transfer that has not completed after this many seconds fails.
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _chunk_fits_message(self) -> KVTransferConfig:
        if self.chunk_bytes + 65536 > self.max_message_bytes:
            raise ValueError("chunk_bytes must be at least 64 KiB below max_message_bytes")
        return self


class RouterConfig(_Section):
    host: str = "127.0.0.1"
    # 0 picks a free port (tests).
    port: int = Field(default=50051, ge=0, le=65535)
    # Requests admitted and not yet finished; more are rejected with RESOURCE_EXHAUSTED.
    max_inflight_requests: int = Field(default=256, ge=1)


class LimitsConfig(_Section):
    """Bounds on every request field."""

    max_tokens: int = Field(default=1024, ge=1)
    max_stop_strings: int = Field(default=8, ge=0)
    max_stop_string_chars: int = Field(default=64, ge=1)
    max_stop_token_ids: int = Field(default=32, ge=0)
    # Largest GenerateRequest message accepted by the router's gRPC server.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)


class TimeoutsConfig(_Section):
    # Deadline of a request whose client set none.
    default_deadline_s: float = Field(default=300.0, gt=0)
    # Cap on any client deadline.
    max_deadline_s: float = Field(default=900.0, gt=0)
    # How long `pdserve serve` waits for replicas to load the model.
    replica_start_s: float = Field(default=900.0, gt=0)
    # How often the router polls replica load and liveness.
    load_poll_interval_s: float = Field(default=0.5, gt=0)
    # A replica that does not answer a poll within this is marked unresponsive.
    load_poll_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> TimeoutsConfig:
        if self.default_deadline_s > self.max_deadline_s:
            raise ValueError("default_deadline_s must not exceed max_deadline_s")
        return self


class RayConfig(_Section):
    # None starts a local Ray instance; "auto" or "host:port" joins a cluster.
    address: str | None = None
    # CPUs a local instance advertises (None = the machine's count).
    num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "pdserve"


class PdserveConfig(_Section):
    """The whole config tree."""

    model: ModelConfig = ModelConfig()
    mode: Literal["disaggregated"] = "disaggregated"
    ray: RayConfig = RayConfig()
    prefill: PrefillPoolConfig = PrefillPoolConfig()
    decode: DecodePoolConfig = DecodePoolConfig()
    kv_transfer: KVTransferConfig = KVTransferConfig()
    router: RouterConfig = RouterConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _cross_checks(self) -> PdserveConfig:
        if self.limits.max_tokens >= self.model.max_context_tokens:
            raise ValueError("limits.max_tokens must be below model.max_context_tokens")
        return self

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
    """Reads and validates one YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, origin=str(path))


def _describe(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {err['msg']}")
    return f"{origin}: invalid config\n  " + "\n  ".join(lines)
