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
    # Root folder the embedded model is converted into (once, keyed by its sha256);
    # None = ~/.cache/pdserve/models.
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
    # Prompts waiting for a forward pass; more are rejected with RESOURCE_EXHAUSTED.
    max_waiting_requests: int = Field(default=256, ge=1)
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

    # auto: shm for a prefill/decode pair on one node, grpc otherwise (decided per request).
    transport: Literal["auto", "grpc", "shm", "nccl"] = "auto"
    # Address the decode replicas' KV servers bind to and advertise to prefill replicas.
    # "127.0.0.1" keeps KV on one machine; "auto" uses the IP Ray knows each node by
    # (`ray.util.get_node_ip_address()`), which multi-node clusters need.
    host: str = Field(default="127.0.0.1", min_length=1)
    # Target payload bytes per chunk (a chunk never exceeds max_message_bytes).
    chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    # Largest gRPC message either side accepts.
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=65536)
    # A transfer that has not completed after this many seconds fails.
    timeout_s: float = Field(default=30.0, gt=0)
    # Send each layer's KV as soon as the prefill pass has computed it, overlapping the
    # hand-off with the rest of the pass (false: send after the pass, to measure the gain).
    layer_pipelining: bool = True
    # Internal token every KV call between replicas must carry. Leave unset: `pdserve serve`
    # mints a random one per start (replicas get it with their config; clients never do).
    auth_token: str | None = Field(default=None, min_length=16)
    # TLS on the KV port: the decode replicas' certificate and key (PEM), and the CA prefill
    # replicas verify them with. All three or none.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> KVTransferConfig:
        files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(files) and not all(files):
            raise ValueError(
                "kv_transfer.tls_cert_file, kv_transfer.tls_key_file and kv_transfer.tls_ca_file "
                "must be set together"
            )
        return self

    @model_validator(mode="after")
    def _chunk_fits_message(self) -> KVTransferConfig:
        if self.chunk_bytes + 65536 > self.max_message_bytes:
            raise ValueError(
                f"kv_transfer.chunk_bytes ({self.chunk_bytes}) must be at least 64 KiB below "
                f"kv_transfer.max_message_bytes ({self.max_message_bytes})"
            )
        return self


class RouterConfig(_Section):
    # Interface the public gRPC server binds to; "0.0.0.0" accepts remote clients.
    host: str = Field(default="127.0.0.1", min_length=1)
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


class SecurityConfig(_Section):
    """Who may call the public gRPC API, and whether it is served over TLS.

    Only paths live here: the router reads the files once when it starts (replicas receive this
    section too and never open them)."""

    # File of accepted bearer tokens, one per line (blank and `#` lines ignored);
    # None = the public API is open to anyone who can reach it.
    api_tokens_file: str | None = Field(default=None, min_length=1)
    # PEM certificate chain and private key of the public port; both or neither (None = no TLS).
    tls_cert_file: str | None = Field(default=None, min_length=1)
    tls_key_file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _tls_pair(self) -> SecurityConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "security.tls_cert_file and security.tls_key_file must be set together "
                "(both for TLS, neither for plaintext)"
            )
        return self


class MetricsConfig(_Section):
    """Prometheus metrics: the router and every replica serve `/metrics` over HTTP."""

    # Serve the endpoints (false: metrics are still counted, but nothing listens).
    enabled: bool = True
    # Interface the endpoints bind to; "0.0.0.0" lets a remote Prometheus scrape them.
    host: str = Field(default="127.0.0.1", min_length=1)
    # Port of the router's endpoint; 0 picks a free port.
    router_port: int = Field(default=9400, ge=0, le=65535)
    # Port of each replica's endpoint; 0 picks a free port per replica (a replica reports its
    # address in its load report). A fixed port fits one replica per node only.
    replica_port: int = Field(default=0, ge=0, le=65535)


class TimeoutsConfig(_Section):
    # Deadline of a request whose client set none.
    default_deadline_s: float = Field(default=300.0, gt=0)
    # Cap on any client deadline.
    max_deadline_s: float = Field(default=900.0, gt=0)
    # How long `pdserve serve` waits for replicas to load the model.
    replica_start_s: float = Field(default=900.0, gt=0)
    # On shutdown (SIGTERM, Ctrl-C): how long in-flight streams may run before they are cut.
    drain_grace_s: float = Field(default=30.0, ge=0)
    # How often the router polls replica load and liveness.
    load_poll_interval_s: float = Field(default=0.5, gt=0)
    # A replica that does not answer a poll within this is marked unresponsive.
    load_poll_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> TimeoutsConfig:
        if self.default_deadline_s > self.max_deadline_s:
            raise ValueError(
                f"timeouts.default_deadline_s ({self.default_deadline_s}) must not exceed "
                f"timeouts.max_deadline_s ({self.max_deadline_s})"
            )
        return self


class ReliabilityConfig(_Section):
    """What the router does when a replica dies or stalls under a request."""

    # Before any token was streamed: how many times to start over on other replicas.
    prefill_retries: int = Field(default=1, ge=0, le=5)
    # After tokens were streamed: "fail" ends the stream with UNAVAILABLE (saying how many
    # tokens were sent); "migrate" re-prefills prompt + generated tokens on a live pair and
    # continues the same stream with no duplicate or missing token.
    on_decode_failure: Literal["fail", "migrate"] = "migrate"
    # Most migrations of one request.
    max_migrations: int = Field(default=1, ge=0, le=5)
    # Times Ray restarts a dead replica (it reloads the model and rejoins with a new epoch).
    max_replica_restarts: int = Field(default=3, ge=0, le=1000)


class FaultsConfig(_Section):
    """Fault injection for tests and chaos runs. Off by default: faults hit only requests
    whose prompt starts with `target_token_id`, and there is none unless it is set."""

    target_token_id: int | None = Field(default=None, ge=0)
    # Pause the prefill pass of a batch holding a target request.
    prefill_delay_s: float = Field(default=0.0, ge=0, le=600)
    # Pause every decode step that runs a target request.
    decode_step_delay_s: float = Field(default=0.0, ge=0, le=600)
    # Raise while a decode step handles a target request (only that request fails).
    fail_decode_step: bool = False
    # Damage one chunk of a target request's KV transfer on the wire, after checksums.
    kv_chunk_fault: Literal["none", "corrupt", "drop", "duplicate", "delay"] = "none"
    # Which chunk (its seq) is damaged, and how late a delayed one is.
    kv_chunk_fault_seq: int = Field(default=0, ge=0)
    kv_chunk_delay_s: float = Field(default=0.0, ge=0, le=600)

    @property
    def enabled(self) -> bool:
        return self.target_token_id is not None


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
