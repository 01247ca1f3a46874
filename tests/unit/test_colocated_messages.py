"""The colocated replica's messages round-trip through msgpack with every field, and decoding
refuses what does not fit them."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from pdserve.errors import ErrorInfo, StatusCode
from pdserve.messages import (
    ColocatedEvent,
    ColocatedRequest,
    LoadReport,
    MessageError,
    SamplingParams,
    TokenLogprobs,
    decode,
    encode,
)

REQUEST = ColocatedRequest(
    request_id="r1", transfer_id="t1", prompt_token_ids=[5, 6, 2**40],
    sampling=SamplingParams(max_tokens=9, temperature=0.5, seed=3, stop_token_ids=[4]),
    eos_token_ids=[0, 2], deadline=1.7e9 + 0.5, num_previous_tokens=1, priority=-2,
    admitted_at=1.7e9 + 0.25,
)
EVENT = ColocatedEvent(
    token_ids=[7, 8], finish_reason="length", queue_s=0.25, prefill_s=0.5, decode_s=1.5,
    error=ErrorInfo(code=StatusCode.RESOURCE_EXHAUSTED, message="KV cache full"),
    logprobs=[TokenLogprobs(7, -0.25, [7, 3], [-0.25, -1.5]), TokenLogprobs(8, -3.0)],
    num_cached_tokens=32, preempted=True,
)
REPORT = LoadReport(
    replica_id="colocated-0", role="colocated", pid=7, node_id="n", num_active_requests=3,
    num_waiting_requests=1, num_free_blocks=4, num_total_blocks=9, total_requests=11,
    total_decode_steps=20, total_decode_tokens=30, total_prefill_chunks=12, total_mixed_steps=5,
    total_preemptions=4,
)


@pytest.mark.parametrize("message", [REQUEST, EVENT, REPORT], ids=lambda m: type(m).__name__)
def test_round_trip_keeps_every_field(message: object) -> None:
    assert decode(type(message), encode(message)) == message


def test_samples_set_every_colocated_field() -> None:
    for message in (REQUEST, EVENT):
        for f in dataclasses.fields(message):
            if f.default is not dataclasses.MISSING:
                assert getattr(message, f.name) != f.default, f.name
    assert REPORT.total_prefill_chunks and REPORT.total_mixed_steps


@pytest.mark.parametrize(
    ("field", "value"),
    [("prompt_token_ids", [1, "2"]), ("deadline", "soon"), ("num_previous_tokens", True)],
)
def test_a_request_with_a_wrong_type_is_refused(field: str, value: object) -> None:
    raw = msgpack.unpackb(encode(REQUEST), raw=False)
    raw[field] = value
    with pytest.raises(MessageError, match=field):
        decode(ColocatedRequest, msgpack.packb(raw, use_bin_type=True))


def test_an_event_with_an_unknown_key_is_refused() -> None:
    raw = msgpack.unpackb(encode(EVENT), raw=False)
    raw["kv_bytes"] = 1
    with pytest.raises(MessageError, match="unknown keys"):
        decode(ColocatedEvent, msgpack.packb(raw, use_bin_type=True))
