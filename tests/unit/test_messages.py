"""Control messages: msgpack round trips, and everything `decode` must refuse."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from typing import Any

import msgpack
import pytest

from pdserve.errors import ErrorInfo, StatusCode
from pdserve.messages import (
    MAX_CONTROL_MESSAGE_BYTES,
    DecodeEvent,
    DecodeRequest,
    KVTarget,
    LoadReport,
    MessageError,
    ModelInfo,
    NamedToken,
    PrefillEvent,
    PrefillRequest,
    ReserveReply,
    ReserveRequest,
    SamplingParams,
    TokenLogprobs,
    decode,
    encode,
)

SAMPLING = SamplingParams(
    max_tokens=17,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=1234,
    stop_token_ids=[5, 6],
    ignore_eos=True,
    min_tokens=3,
    logprobs=True,
    top_logprobs=2,
)
TARGET = KVTarget(replica_id="decode-1", address="127.0.0.1:5555", transport="grpc")
ERROR = ErrorInfo(code=StatusCode.DATA_LOSS, message="chunk 3: checksum mismatch — ünïcode")
LOGPROBS = TokenLogprobs(
    token_id=42, logprob=-0.125, top_token_ids=[42, 7], top_logprobs=[-0.125, -2.5]
)

# One instance of every message type, every field set to a value other than its default so a
# codec that drops or renames a field cannot round-trip it.
MESSAGES: list[Any] = [
    SAMPLING,
    TARGET,
    ERROR,
    PrefillRequest(
        request_id="r1",
        transfer_id="t1",
        prompt_token_ids=[1, 2, 3, 2**40],
        sampling=SAMPLING,
        eos_token_ids=[0, 2],
        kv_target=TARGET,
        deadline=1.7e9 + 0.25,
        num_previous_tokens=3,
    ),
    PrefillEvent(
        kind="transferred",
        token_id=42,
        finished=True,
        queue_s=0.5,
        prefill_s=1.25,
        transfer_s=0.125,
        num_bytes=123456,
        transport="inproc",
        error=ERROR,
        logprobs=LOGPROBS,
        num_cached_tokens=16,
    ),
    ReserveRequest(
        request_id="r2", transfer_id="t2", num_prompt_tokens=9, max_tokens=33, deadline=12.5,
        priority=-2, admitted_at=1234.25,
    ),
    ReserveReply(ok=True, kv_address="inproc://3", error=ERROR),
    DecodeRequest(
        request_id="r3",
        transfer_id="t3",
        sampling=SAMPLING,
        eos_token_ids=[7],
        deadline=12345.5,
        num_previous_tokens=2,
        prompt_first_token_id=11,
        priority=3,
        admitted_at=99.5,
    ),
    DecodeEvent(
        token_ids=[8, 9, 10], finish_reason="length", kv_wait_s=0.25, decode_s=2.5, error=ERROR,
        logprobs=[
            TokenLogprobs(8, -0.5), TokenLogprobs(9, -1.0), TokenLogprobs(10, -0.0, [10], [-0.0])
        ],
        preempted=True,
    ),
    LoadReport(
        replica_id="p0",
        role="prefill",
        pid=77,
        node_id="node",
        num_active_requests=3,
        num_waiting_requests=2,
        num_free_blocks=10,
        num_total_blocks=20,
        kv_address="x:1",
        num_transfers=1,
        num_leases=2,
        total_kv_bytes=10**12,
        total_requests=5,
        epoch="epoch-1",
        total_decode_steps=6,
        total_decode_tokens=7,
        metrics_address="127.0.0.1:9401",
        total_prefill_chunks=8,
        total_mixed_steps=9,
        num_cached_blocks=4,
        total_prompt_tokens=1000,
        total_cached_prompt_tokens=640,
        total_preemptions=3,
        num_stalled_readers=2,
        kernels="native (avx512; float32)",
    ),
    LOGPROBS,
    NamedToken(name="eos_token", text="<|im_end|>"),
    ModelInfo(
        model="tiny",
        dtype="bfloat16",
        model_type="llama",
        vocab_size=400,
        max_context_tokens=512,
        eos_token_ids=[0],
        tokenizer_json='{"a": 1}',
        kv_fingerprint="abc",
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
        special_tokens=[NamedToken("bos_token", "<s>"), NamedToken("eos_token", "</s>")],
    ),
]


def raw(message: Any) -> dict[str, Any]:
    """The plain msgpack map of `message`, to be tampered with."""
    return msgpack.unpackb(encode(message), raw=False)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_field_of_the_samples_differs_from_its_default(message: Any) -> None:
    for f in dataclasses.fields(message):
        if f.default is not dataclasses.MISSING:
            assert getattr(message, f.name) != f.default, f.name
        if f.default_factory is not dataclasses.MISSING:
            assert getattr(message, f.name) != f.default_factory(), f.name


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    back = decode(type(message), data)
    assert back == message
    assert type(back) is type(message)


def test_round_trip_keeps_nested_types() -> None:
    request = decode(PrefillRequest, encode(MESSAGES[3]))
    assert type(request.sampling) is SamplingParams
    assert type(request.kv_target) is KVTarget
    event = decode(DecodeEvent, encode(DecodeEvent(error=ERROR)))
    assert event.error is not None and event.error.code is StatusCode.DATA_LOSS


def test_defaults_and_none_round_trip() -> None:
    assert decode(SamplingParams, encode(SamplingParams(max_tokens=1))) == SamplingParams(1)
    assert decode(PrefillEvent, encode(PrefillEvent(kind="first_token"))).error is None
    assert decode(SamplingParams, pack({"max_tokens": 3})) == SamplingParams(max_tokens=3)


def test_int_is_accepted_for_float_and_becomes_float() -> None:
    sampling = decode(SamplingParams, pack({"max_tokens": 3, "temperature": 1}))
    assert type(sampling.temperature) is float and sampling.temperature == 1.0


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(TARGET)
    assert decode(KVTarget, bytearray(data)) == TARGET
    assert decode(KVTarget, memoryview(data)) == TARGET


@pytest.mark.parametrize("data", ["a string", None, 12, {"replica_id": "x"}, [1, 2]])
def test_decode_rejects_non_bytes(data: Any) -> None:
    with pytest.raises(MessageError, match="expected bytes"):
        decode(KVTarget, data)


def test_decode_of_a_multi_byte_memoryview_raises_only_message_errors() -> None:
    target = KVTarget(replica_id="x", address="a", transport="b")
    while len(encode(target)) % 8:
        target = dataclasses.replace(target, address=target.address + "a")
    view = memoryview(encode(target)).cast("Q")
    # Refusing non-byte views is fine too; any other exception is not.
    with contextlib.suppress(MessageError):
        assert decode(KVTarget, view) == target
    # The limit counts bytes, not 8-byte items.
    too_big = memoryview(b"\x00" * (MAX_CONTROL_MESSAGE_BYTES + 8)).cast("Q")
    assert len(too_big) < MAX_CONTROL_MESSAGE_BYTES
    with pytest.raises(MessageError):
        decode(KVTarget, too_big)


def test_decode_checks_the_size_before_parsing() -> None:
    overhead = len(encode(dataclasses.replace(MESSAGES[-1], tokenizer_json="")))
    fits = dataclasses.replace(
        MESSAGES[-1], tokenizer_json="x" * (MAX_CONTROL_MESSAGE_BYTES - overhead - 8)
    )
    data = encode(fits)
    assert len(data) <= MAX_CONTROL_MESSAGE_BYTES
    assert decode(ModelInfo, data) == fits
    too_big = dataclasses.replace(fits, tokenizer_json=fits.tokenizer_json + "x" * 64)
    data = encode(too_big)
    assert len(data) > MAX_CONTROL_MESSAGE_BYTES
    with pytest.raises(MessageError, match="limit"):
        decode(ModelInfo, data)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", encode(TARGET)[:-1], encode(TARGET) + b"\x00", b"\xdb\xff\xff\xff\xff"],
    ids=["empty", "reserved-byte", "truncated", "trailing-byte", "huge-str-header"],
)
def test_decode_rejects_invalid_msgpack(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(KVTarget, data)


@pytest.mark.parametrize("value", [[1, 2], "text", 5, None, True])
def test_decode_rejects_a_top_level_that_is_not_a_map(value: Any) -> None:
    with pytest.raises(MessageError, match="expected a map"):
        decode(KVTarget, pack(value))


def test_decode_rejects_non_string_map_keys() -> None:
    with pytest.raises(MessageError):
        decode(KVTarget, pack({1: "x", "replica_id": "a", "address": "b", "transport": "c"}))


def test_decode_refuses_binary_payloads() -> None:
    # max_bin_len=0: no message has a binary field, so any bin value is refused unread.
    message = raw(TARGET)
    message["address"] = b"127.0.0.1"
    with pytest.raises(MessageError, match="max_bin_len"):
        decode(KVTarget, pack(message))
    # A str field smuggled in as bytes by the encoder is refused the same way.
    with pytest.raises(MessageError):
        decode(KVTarget, encode(KVTarget(replica_id=b"x", address="a", transport="b")))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [msgpack.ExtType(1, b"\x80\x04N."), msgpack.Timestamp(1, 0)])
def test_decode_refuses_ext_types(value: Any) -> None:
    message = raw(TARGET)
    message["replica_id"] = value
    with pytest.raises(MessageError):
        decode(KVTarget, pack(message))
    with pytest.raises(MessageError):
        decode(KVTarget, pack(value))


def test_decode_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode called the unpickler")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(MessageError):
            decode(KVTarget, pickle.dumps(TARGET, protocol=protocol))
    # A pickle wrapped in a msgpack ext type is refused too.
    message = raw(TARGET)
    message["address"] = msgpack.ExtType(42, pickle.dumps(TARGET))
    with pytest.raises(MessageError):
        decode(KVTarget, pack(message))


def test_decode_rejects_unknown_keys() -> None:
    message = raw(TARGET)
    message["extra"] = 1
    with pytest.raises(MessageError, match="unknown keys"):
        decode(KVTarget, pack(message))
    nested = raw(MESSAGES[3])
    nested["sampling"]["beam_width"] = 4
    with pytest.raises(MessageError, match="unknown keys"):
        decode(PrefillRequest, pack(nested))


@pytest.mark.parametrize("name", ["replica_id", "address", "transport"])
def test_decode_rejects_missing_required_keys(name: str) -> None:
    message = raw(TARGET)
    del message[name]
    with pytest.raises(MessageError, match=f"{name}: missing"):
        decode(KVTarget, pack(message))


def test_decode_rejects_missing_nested_keys() -> None:
    message = raw(MESSAGES[3])
    del message["kv_target"]["address"]
    with pytest.raises(MessageError, match="address: missing"):
        decode(PrefillRequest, pack(message))
    message = raw(MESSAGES[3])
    del message["sampling"]["max_tokens"]
    with pytest.raises(MessageError, match="max_tokens: missing"):
        decode(PrefillRequest, pack(message))


@pytest.mark.parametrize(
    ("cls", "path", "value"),
    [
        (ReserveRequest, ["num_prompt_tokens"], "3"),
        (ReserveRequest, ["num_prompt_tokens"], True),
        (ReserveRequest, ["num_prompt_tokens"], 3.0),
        (ReserveRequest, ["num_prompt_tokens"], None),
        (ReserveRequest, ["num_prompt_tokens"], [3]),
        (ReserveRequest, ["request_id"], 5),
        (ReserveRequest, ["request_id"], None),
        (ReserveReply, ["ok"], 1),
        (ReserveReply, ["ok"], "true"),
        (SamplingParams, ["temperature"], "0.5"),
        (SamplingParams, ["temperature"], False),
        (SamplingParams, ["seed"], 1.5),
        (SamplingParams, ["seed"], True),
        (SamplingParams, ["stop_token_ids"], 5),
        (SamplingParams, ["stop_token_ids"], "5"),
        (SamplingParams, ["stop_token_ids"], [1, "2"]),
        (SamplingParams, ["stop_token_ids"], [1, True]),
        (SamplingParams, ["stop_token_ids"], [1, 2.0]),
        (SamplingParams, ["stop_token_ids"], [1, None]),
        (PrefillRequest, ["prompt_token_ids"], [1, 2, 3.0]),
        (PrefillRequest, ["prompt_token_ids"], {"a": 1}),
        (PrefillRequest, ["sampling"], [17]),
        (PrefillRequest, ["sampling"], None),
        (PrefillRequest, ["sampling", "max_tokens"], "17"),
        (PrefillRequest, ["sampling", "top_k"], False),
        (PrefillRequest, ["kv_target", "address"], 5555),
        (PrefillRequest, ["deadline"], "soon"),
        (PrefillEvent, ["error"], "DATA_LOSS"),
        (PrefillEvent, ["error", "message"], 3),
        (DecodeEvent, ["token_ids"], [1, [2]]),
        (LoadReport, ["total_kv_bytes"], 1.0),
    ],
)
def test_decode_rejects_wrong_types(cls: type, path: list[str], value: Any) -> None:
    sample = next(m for m in MESSAGES if type(m) is cls)
    message = raw(sample)
    target = message
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MessageError, match=path[-1]):
        decode(cls, pack(message))


@pytest.mark.parametrize("code", ["NOT_A_CODE", "ok", "", 5, None, True, ["CANCELLED"]])
def test_decode_rejects_unknown_status_codes(code: Any) -> None:
    message = raw(ReserveReply(ok=False, error=ErrorInfo(StatusCode.CANCELLED, "x")))
    message["error"]["code"] = code
    with pytest.raises(MessageError, match="code"):
        decode(ReserveReply, pack(message))


@pytest.mark.parametrize("code", list(StatusCode))
def test_every_status_code_round_trips(code: StatusCode) -> None:
    reply = decode(ReserveReply, encode(ReserveReply(ok=False, error=ErrorInfo(code, "m"))))
    assert reply.error is not None and reply.error.code is code
