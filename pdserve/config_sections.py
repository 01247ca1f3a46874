"""The sections of the config tree: one frozen, validated pydantic model per YAML section.

Only `pdserve.config` assembles them into the tree and reads YAML; import from there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(ConfigSection):
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
    # The model id the OpenAI API lists and expects in `model`; None = `source`.
    served_model_name: str | None = Field(default=None, min_length=1, max_length=256)
    # Matrix products and layer operations (prefill and decode): auto = pdserve's native
    # kernels where they build and the CPU has what they need (AVX-512; AVX512-BF16 for
    # bfloat16), else torch's with a WARNING; native = refuse to start without them; torch =
    # torch's own kernels only.
    kernels: Literal["auto", "native", "torch"] = "auto"
    # Weight format of the linear layers: none = the model dtype; int8 = weight-only int8 with
    # one scale per output channel (activations, KV and the embedding stay in `dtype`); w8a8 =
    # the same int8 weights multiplied by activations quantized to int8 per token at run time
    # (AVX512-VNNI). Both need the native kernels.
    quantization: Literal["none", "int8", "w8a8"] = "none"
    # lean: pdserve's own forward pass for the Llama family (same operations, without
    # transformers' per-layer plumbing; token-identical); transformers: the model's forward.
    forward: Literal["lean", "transformers"] = "lean"

    @property
    def served_name(self) -> str:
        """The id clients name the model by (OpenAI `model`)."""
        return self.served_model_name or self.source


class KVTransferConfig(ConfigSection):
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
    # grpc transport: "tcp" moves the chunk bytes over a plain TCP connection opened for the
    # transfer (gRPC carries the header, the commit and a one-time ticket that authenticates
    # the connection); "none" sends the bytes inside the gRPC messages.
    side_channel: Literal["tcp", "none"] = "tcp"
    # The dtype KV travels in, every transport (kvtransfer/wire_dtype.py): "cache" = the cache's
    # own bytes; "bfloat16" halves a float32 cache (lossy; = "cache" for a bfloat16 cache);
    # "int8" = symmetric int8 with one float32 scale per token, head and K/V (lossy, about 1/4
    # of float32). The decode replica converts back to its cache dtype.
    wire_dtype: Literal["cache", "bfloat16", "int8"] = "cache"
    # shm transport: shared memory each prefill replica maps once, touches up front and reuses
    # across transfers, in MiB; 0 = a fresh segment per transfer (slower: every page faults).
    shm_pool_mb: int = Field(default=256, ge=0, le=1_048_576)
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


class RouterConfig(ConfigSection):
    # Interface the public gRPC server binds to; "0.0.0.0" accepts remote clients.
    host: str = Field(default="127.0.0.1", min_length=1)
    # 0 picks a free port (tests).
    port: int = Field(default=50051, ge=0, le=65535)
    # Port of the OpenAI-compatible HTTP API on the same host; 0 picks a free port, None = off.
    http_port: int | None = Field(default=8000, ge=0, le=65535)
    # Requests admitted and not yet finished; more wait in the router's queue.
    max_inflight_requests: int = Field(default=256, ge=1)
    # Requests waiting in the router's queue for capacity (an in-flight slot, decode blocks);
    # more are rejected with RESOURCE_EXHAUSTED.
    max_queued_requests: int = Field(default=1024, ge=0, le=1_000_000)
    # Messages (token updates) the router holds for one stream whose client reads slower than
    # the replicas produce; when full, the router reads no more of that request's stream from
    # its replicas until the client takes one.
    max_buffered_messages: int = Field(default=64, ge=1, le=65536)
    # Threads that render and tokenize long prompts off the router's event loop: at most this
    # many prompts are tokenized at once, more wait their turn.
    tokenizer_threads: int = Field(default=2, ge=1, le=64)


class LimitsConfig(ConfigSection):
    """Bounds on every request field."""

    max_tokens: int = Field(default=1024, ge=1)
    max_stop_strings: int = Field(default=8, ge=0)
    max_stop_string_chars: int = Field(default=64, ge=1)
    max_stop_token_ids: int = Field(default=32, ge=0)
    # Largest request accepted: a gRPC GenerateRequest message or an HTTP request body.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Most sequences one OpenAI request may ask for (`n`).
    max_n: int = Field(default=4, ge=1, le=64)


class SecurityConfig(ConfigSection):
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


class MetricsConfig(ConfigSection):
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


class TimeoutsConfig(ConfigSection):
    # Deadline of a request whose client set none.
    default_deadline_s: float = Field(default=300.0, gt=0)
    # Cap on any client deadline.
    max_deadline_s: float = Field(default=900.0, gt=0)
    # How long `pdserve serve` waits for replicas to load the model.
    replica_start_s: float = Field(default=900.0, gt=0)
    # On shutdown (SIGTERM, Ctrl-C) and on a scale-down: how long in-flight streams may run on
    # a draining router or replica before they are cut.
    drain_grace_s: float = Field(default=30.0, ge=0)
    # A stream whose client has accepted no data for this long while a message waits to be
    # sent (no HTTP/2 flow-control window, an unread socket) is cancelled: its work on the
    # replicas is aborted and its KV freed.
    client_stall_s: float = Field(default=30.0, gt=0)
    # A stream whose client has accepted no data for this long while a message waits marks its
    # request's sequence on the replica as a stalled reader: the first preemption victim there
    # while it stays stalled (unmarked once the client reads again).
    reader_slow_s: float = Field(default=1.0, gt=0)
    # How often the router polls replica load and liveness.
    load_poll_interval_s: float = Field(default=0.5, gt=0)
    # A replica that does not answer a poll within this is marked unresponsive.
    load_poll_timeout_s: float = Field(default=5.0, gt=0)
    # Longest wait for a replica's answer to a control call on a request's path (a decode
    # reservation): no answer in time counts the replica lost for that attempt and suspect
    # (no new placements) until it answers a poll again. A request never waits on one replica
    # for more than its share of the time left (split between the replicas it may try).
    control_call_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> TimeoutsConfig:
        if self.default_deadline_s > self.max_deadline_s:
            raise ValueError(
                f"timeouts.default_deadline_s ({self.default_deadline_s}) must not exceed "
                f"timeouts.max_deadline_s ({self.max_deadline_s})"
            )
        if self.reader_slow_s >= self.client_stall_s:
            raise ValueError(
                f"timeouts.reader_slow_s ({self.reader_slow_s}) must be less than "
                f"timeouts.client_stall_s ({self.client_stall_s})"
            )
        return self


class ReliabilityConfig(ConfigSection):
    """What the router does when a replica dies or stalls under a request."""

    # Before any token was streamed: how many times to start over on other replicas.
    prefill_retries: int = Field(default=1, ge=0, le=5)
    # After tokens were streamed: "fail" ends the stream with UNAVAILABLE (saying how many
    # tokens were sent); "migrate" re-prefills prompt + generated tokens on a live pair and
    # continues the same stream with no duplicate or missing token.
    on_decode_failure: Literal["fail", "migrate"] = "migrate"
    # Most migrations of one request.
    max_migrations: int = Field(default=1, ge=0, le=5)
    # Most preemptions of one request (a decode replica freed its KV to let older sequences
    # grow; the router re-prefilled it); one more fails it with RESOURCE_EXHAUSTED.
    max_preemptions: int = Field(default=8, ge=0, le=1000)
    # Times Ray restarts a dead replica (it reloads the model and rejoins with a new epoch).
    max_replica_restarts: int = Field(default=3, ge=0, le=1000)


class FaultsConfig(ConfigSection):
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


class RayConfig(ConfigSection):
    # None starts a local Ray instance; "auto" or "host:port" joins a cluster.
    address: str | None = None
    # CPUs a local instance advertises (None = the machine's count).
    num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "pdserve"
