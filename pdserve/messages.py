"""Control-plane messages between the router and the replicas, with explicit msgpack codecs.

Every Ray actor call between the router and a replica carries `bytes` made by `encode()` here
and is read back by `decode(cls, data)`, never a Python object: nothing pickled by us crosses a
process boundary. Each message type is a frozen dataclass whose fields are plain scalars,
lists of ints, or other message types declared in `_NESTED`; decoding checks the payload size,
unknown and missing keys, and every field's type before building the object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

import msgpack

from pdserve.errors import ErrorInfo, PdserveError, StatusCode

# Control messages are small; prompts are bounded by config far below this.
MAX_CONTROL_MESSAGE_BYTES = 16 * 1024 * 1024


class MessageError(PdserveError):
    """A control message is malformed (wrong type, size, or keys)."""

    code = StatusCode.INTERNAL


# Temperatures under this sample greedily (see SamplingParams.greedy).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How a replica picks tokens and when it stops (already validated by the router)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # EOS and `stop_token_ids` cannot be sampled before this many tokens were generated.
    min_tokens: int = 0
    # Report each sampled token's log-probability (a `TokenLogprobs` per token) ...
    logprobs: bool = False
    # ... with this many most likely alternatives (0..20); only with `logprobs`.
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32 (a temperature of 1e-43 turned
        # every score into inf and the probabilities into NaN): sample greedily instead, as
        # such a temperature means.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one sampled token, from the model's distribution before
    temperature, top-k/top-p and min_tokens are applied (log_softmax of the raw logits)."""

    token_id: int
    logprob: float
    # The `top_logprobs` most likely token ids, most likely first, and their log-probabilities.
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class KVTarget:
    """Where prefill sends one request's KV."""

    replica_id: str
    address: str
    transport: str


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    transfer_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: list[int]
    kv_target: KVTarget
    # Absolute wall-clock deadline (time.time()).
    deadline: float
    # Tokens already generated (and streamed) before this prefill, at the end of
    # prompt_token_ids: a migrated request continues from them.
    num_previous_tokens: int = 0


@dataclass(frozen=True)
class PrefillEvent:
    """One event of a prefill stream: `first_token`, then `transferred` (or `error`)."""

    kind: str
    token_id: int = -1
    # True when the first token already ends the request (EOS, stop id, max_tokens == 1);
    # no KV is sent then.
    finished: bool = False
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    num_bytes: int = 0
    transport: str = ""
    error: ErrorInfo | None = None
    # `first_token` only: the first token's log-probabilities (when the request asked for them)
    # and the prompt tokens whose KV came from the prefix cache.
    logprobs: TokenLogprobs | None = None
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class ReserveRequest:
    """Ask a decode replica to reserve KV blocks for one request before prefill starts."""

    request_id: str
    transfer_id: str
    num_prompt_tokens: int
    max_tokens: int
    # The request's wall-clock deadline: an unclaimed reservation is freed after it.
    deadline: float = 0.0
    # Scheduling order of the request: lower `priority` first, then earlier `admitted_at`
    # (the router's wall-clock admission time, kept across re-prefills). Preemption picks its
    # victims in the reverse order.
    priority: int = 0
    admitted_at: float = 0.0


@dataclass(frozen=True)
class ReserveReply:
    ok: bool
    kv_address: str = ""
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class DecodeRequest:
    request_id: str
    transfer_id: str
    sampling: SamplingParams
    eos_token_ids: list[int]
    deadline: float
    # See PrefillRequest.num_previous_tokens.
    num_previous_tokens: int = 0
    # The prompt's first token id; used only to aim injected faults (config `faults`).
    prompt_first_token_id: int = -1
    # See ReserveRequest.priority and admitted_at.
    priority: int = 0
    admitted_at: float = 0.0


@dataclass(frozen=True)
class DecodeEvent:
    """Tokens sampled since the last event; the last event has `finish_reason` or `error`."""

    token_ids: list[int] = field(default_factory=list)
    # "stop" or "length" on the last event.
    finish_reason: str = ""
    kv_wait_s: float = 0.0
    decode_s: float = 0.0
    error: ErrorInfo | None = None
    # One entry per token id when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # The last event of a sequence the replica preempted (its KV blocks are freed): the router
    # re-prefills prompt + every token received so far and continues the stream.
    preempted: bool = False


@dataclass(frozen=True)
class ColocatedRequest:
    """One request on a colocated replica, which prefills and decodes it (no KV hand-off)."""

    request_id: str
    # Minted by the router per attempt; owns the request's KV blocks on the replica.
    transfer_id: str
    # The prompt, then the tokens generated before a migration (see num_previous_tokens).
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: list[int]
    # Absolute wall-clock deadline (time.time()).
    deadline: float
    num_previous_tokens: int = 0
    # See ReserveRequest.priority and admitted_at.
    priority: int = 0
    admitted_at: float = 0.0


@dataclass(frozen=True)
class ColocatedEvent:
    """Tokens sampled since the last event; the last event has `finish_reason` or `error`.
    The event with the first token carries `queue_s` and `prefill_s`, the last `decode_s`."""

    token_ids: list[int] = field(default_factory=list)
    # "stop" or "length" on the last event.
    finish_reason: str = ""
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    error: ErrorInfo | None = None
    # One entry per token id when the request asked for logprobs, else empty.
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # On the event with the first token: prompt tokens whose KV came from the prefix cache.
    num_cached_tokens: int = 0
    # See DecodeEvent.preempted.
    preempted: bool = False


@dataclass(frozen=True)
class LoadReport:
    """A replica's live load, polled by the router."""

    replica_id: str
    role: str
    pid: int
    node_id: str
    num_active_requests: int
    num_waiting_requests: int
    num_free_blocks: int
    num_total_blocks: int
    # Decode replicas: the address of their KV receiver.
    kv_address: str = ""
    # Number of KV transfers in flight (sending on prefill, receiving on decode).
    num_transfers: int = 0
    # Prefill: finished KV held under a lease.
    num_leases: int = 0
    # Lifetime totals, for tests and metrics.
    total_kv_bytes: int = 0
    total_requests: int = 0
    # Random id of this incarnation of the replica: a restarted replica has a new one, and
    # whatever the router placed on the old one is lost.
    epoch: str = ""
    # Decode: forward steps run and tokens they produced (tokens > steps means batching).
    total_decode_steps: int = 0
    total_decode_tokens: int = 0
    # "host:port" of the replica's Prometheus `/metrics` endpoint ("" when not served).
    metrics_address: str = ""
    # Colocated: prompt chunks prefilled (more chunks than requests means chunked prefill),
    # and steps whose one forward pass carried decode tokens and prompt chunks together.
    total_prefill_chunks: int = 0
    total_mixed_steps: int = 0
    # Prefill prefix cache: blocks whose KV is kept for reuse (referenced or not), and lifetime
    # prompt tokens batched and those of them served from the cache (hit rate = cached / all).
    num_cached_blocks: int = 0
    total_prompt_tokens: int = 0
    total_cached_prompt_tokens: int = 0
    # Decode and colocated: sequences preempted (blocks freed, handed back to the router).
    total_preemptions: int = 0
    # Decode and colocated: requests whose client is not reading (first preemption victims).
    num_stalled_readers: int = 0
    # What runs the linear layers of its decode steps, e.g. "native (avx512; float32)" or
    # "torch (<why not native>)".
    kernels: str = ""


@dataclass(frozen=True)
class NamedToken:
    """One named special token of a tokenizer, e.g. name `eos_token`, text `<|im_end|>`."""

    name: str
    text: str


@dataclass(frozen=True)
class ModelInfo:
    """What the router needs to know about the served model (from a replica)."""

    model: str
    dtype: str
    model_type: str
    vocab_size: int
    max_context_tokens: int
    eos_token_ids: list[int]
    # tokenizers' JSON serialisation of the model's tokenizer.
    tokenizer_json: str
    kv_fingerprint: str
    # The tokenizer's Jinja chat template ("" when the model has none) and the named special
    # tokens the template may use (`bos_token`, `eos_token`, ...), as
    # `transformers`' `apply_chat_template` passes them.
    chat_template: str = ""
    special_tokens: list[NamedToken] = field(default_factory=list)


T = TypeVar("T")

_SCALARS: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
}
_NESTED: dict[str, type] = {
    "SamplingParams": SamplingParams,
    "KVTarget": KVTarget,
    "ErrorInfo": ErrorInfo,
    "TokenLogprobs": TokenLogprobs,
    "NamedToken": NamedToken,
}


def encode(message: Any) -> bytes:
    """Serialises a message dataclass to msgpack bytes."""
    return msgpack.packb(_to_plain(message), use_bin_type=True)


def decode(cls: type[T], data: bytes) -> T:
    """Parses msgpack bytes into `cls`, checking size, keys and field types."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"{cls.__name__}: expected bytes, got {type(data).__name__}")
    if isinstance(data, memoryview):
        try:
            data = data.cast("B")  # count bytes, and give msgpack a byte buffer
        except TypeError as exc:
            raise MessageError(f"{cls.__name__}: not a byte buffer: {exc}") from None
    if len(data) > MAX_CONTROL_MESSAGE_BYTES:
        raise MessageError(f"{cls.__name__}: {len(data)} bytes exceeds the control message limit")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MessageError(f"{cls.__name__}: not valid msgpack: {exc}") from None
    return _from_plain(cls, raw, cls.__name__)


def _to_plain(value: Any) -> Any:
    if isinstance(value, StatusCode):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise MessageError(f"{where}: expected a map")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(fields)
    if unknown:
        raise MessageError(f"{where}: unknown keys {sorted(unknown)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{where}.{name}: missing")
            continue
        values[name] = _check(hints[name], raw[name], f"{where}.{name}")
    return cls(**values)


def _check(hint: Any, value: Any, where: str) -> Any:
    text = str(hint)
    if text.endswith(" | None") or text.startswith("typing.Optional"):
        if value is None:
            return None
        hint = hint.__args__[0]
    if hint is StatusCode:
        try:
            return StatusCode(value)
        except ValueError:
            raise MessageError(f"{where}: unknown status code {value!r}") from None
    if hint in _SCALARS:
        if isinstance(value, bool) and hint is not bool:
            raise MessageError(f"{where}: expected {hint.__name__}, got bool")
        if not isinstance(value, _SCALARS[hint]):
            raise MessageError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return float(value) if hint is float else value  # type: ignore[arg-type]
    if getattr(hint, "__origin__", None) is list:
        (item,) = hint.__args__
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list")
        return [_check(item, v, f"{where}[]") for v in value]
    nested = _NESTED.get(getattr(hint, "__name__", ""))
    if nested is not None:
        return _from_plain(nested, value, where)
    raise MessageError(f"{where}: unsupported field type {hint}")
