"""`kv_transfer.wire_dtype` in transfers: the receive session and every transport carry fewer
bytes and write the whole KV; unsupported wire dtypes are refused on both sides, naming the
field; any header wire dtype or chunk length gives a typed error only."""

from __future__ import annotations

import dataclasses
import threading

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtransfer import ChunkSpec, TransferError, make_receiver, make_sender, plan_chunks
from kvtransfer.checksum import checksum
from kvtransfer.grpc_codec import message_from_proto, message_to_proto
from kvtransfer.stream import Chunk, ChunkPlan, Header, begin_send
from kvtransfer.wire_dtype import WireDecoder, wire_bytes
from pdserve.config import KVTransferConfig
from pdserve.errors import StatusCode
from pdserve.internal.v1 import kv_transfer_pb2_grpc
from tests.factories.wire_dtype_kv import (
    CONFIG,
    LAYOUT,
    NUM_TOKENS,
    TensorSink,
    TensorSource,
    WireSpy,
    assert_int8_close,
    good_stream,
    kv_values,
    run_session,
)
from tests.unit.test_kv_grpc_transport import DoneRecorder


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "int8"])
def test_session_receives_fewer_wire_bytes_and_writes_whole_kv(wire_dtype: str) -> None:
    messages, kv = good_stream(wire_dtype)
    sink = TensorSink(kv)
    session, done = run_session(messages, sink)
    assert session.end() == LAYOUT.kv_bytes(NUM_TOKENS)
    assert session.num_wire_bytes == wire_bytes(LAYOUT, wire_dtype, NUM_TOKENS)
    assert session.num_wire_bytes < LAYOUT.kv_bytes(NUM_TOKENS)
    assert done.wait().ok and not torch.isnan(sink.kv).any()


@pytest.mark.parametrize("cut", [-1, 1, "scales"])
def test_an_int8_chunk_of_the_wrong_length_is_data_loss_and_writes_nothing(
    cut: int | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages, kv = good_stream("int8")
    first = messages[1]
    assert isinstance(first, Chunk)
    data = bytes(first.data)
    if cut == "scales":
        data = data[:first.spec.num_layers * first.spec.num_tokens * 2 * 2 * 16]
    else:
        data = data[:cut] if cut < 0 else data + b"\0"  # type: ignore[operator]
    # A valid checksum: only the length is wrong.
    messages[1] = Chunk(first.spec, checksum(data), data)
    decodes: list[ChunkSpec] = []
    monkeypatch.setattr(WireDecoder, "decode", lambda self, spec, view: decodes.append(spec))
    sink = TensorSink(kv)
    with pytest.raises(TransferError) as caught:
        run_session(messages, sink)
    assert caught.value.code is StatusCode.DATA_LOSS
    assert "wire_dtype int8" in caught.value.message
    assert sink.num_writes == 0 and decodes == []


@pytest.mark.parametrize(("cache", "wire_dtype"), [("float32", "fp8"), ("float16", "bfloat16")])
def test_receiver_refuses_a_wire_dtype_it_does_not_support(cache: str, wire_dtype: str) -> None:
    layout = dataclasses.replace(LAYOUT, dtype=cache)
    messages, kv = good_stream("cache", layout)
    messages[0] = dataclasses.replace(messages[0], wire_dtype=wire_dtype)
    sink = TensorSink(kv)
    with pytest.raises(TransferError) as caught:
        run_session(messages, sink, layout)
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert caught.value.message.startswith("wire_dtype:")
    assert sink.num_writes == 0


def test_grpc_receiver_refuses_an_unsupported_wire_dtype_in_the_header() -> None:
    config = KVTransferConfig(**{**CONFIG.model_dump(), "side_channel": "none"})
    receiver = make_receiver("grpc", LAYOUT, config)
    receiver.start()
    try:
        kv, done = kv_values(LAYOUT, NUM_TOKENS), DoneRecorder()
        sink = TensorSink(kv)
        receiver.expect("t1", NUM_TOKENS, sink, done)
        messages, _ = good_stream("cache")
        protos = [message_to_proto(message) for message in messages]
        protos[0].header.wire_dtype = "fp4"
        with grpc.insecure_channel(receiver.address) as channel:
            stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Push(iter(protos), timeout=10.0)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "wire_dtype" in caught.value.details()
        assert not done.wait().ok and sink.num_writes == 0
    finally:
        receiver.stop()


def test_header_codec_carries_the_wire_dtype() -> None:
    header = Header("t1", LAYOUT, NUM_TOKENS, 3)
    cache_proto = message_to_proto(header)
    # "cache" leaves the field unset: the header is byte-identical to one without it.
    assert cache_proto.header.wire_dtype == ""
    assert message_from_proto(cache_proto) == header
    int8 = dataclasses.replace(header, wire_dtype="int8")
    assert message_to_proto(int8).header.wire_dtype == "int8"
    assert message_from_proto(message_to_proto(int8)) == int8
    cache_proto.header.wire_dtype = "int8"
    assert len(cache_proto.SerializeToString()) > len(message_to_proto(header).SerializeToString())


def test_begin_send_plans_the_wire_dtype() -> None:
    config = KVTransferConfig(**{**CONFIG.model_dump(), "wire_dtype": "bfloat16"})
    _, _, plan = begin_send(config, "t1", LAYOUT, NUM_TOKENS, None, None)
    assert isinstance(plan, ChunkPlan) and plan.wire_dtype == "bfloat16"
    assert plan.num_wire_bytes == LAYOUT.kv_bytes(NUM_TOKENS) // 2
    assert list(plan) == plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes)
    bf16 = dataclasses.replace(LAYOUT, dtype="bfloat16")
    _, _, plan = begin_send(config, "t1", bf16, NUM_TOKENS, None, None)
    assert plan.wire_dtype == "cache" and plan.num_wire_bytes == bf16.kv_bytes(NUM_TOKENS)


def test_sender_refuses_a_wire_dtype_that_does_not_shrink_before_reading() -> None:
    layout = dataclasses.replace(LAYOUT, dtype="float16")
    config = KVTransferConfig(**{**CONFIG.model_dump(), "wire_dtype": "bfloat16"})
    receiver, sender = make_receiver("inproc", layout, config), make_sender("inproc", config)
    receiver.start()
    try:
        kv, done = kv_values(layout, NUM_TOKENS), DoneRecorder()
        source = TensorSource(kv)
        receiver.expect("t1", NUM_TOKENS, TensorSink(kv), done)
        with pytest.raises(TransferError) as caught:
            sender.send(address=receiver.address, transfer_id="t1", layout=layout,
                        num_tokens=NUM_TOKENS, source=source, first_token_id=1)
        assert caught.value.code is StatusCode.FAILED_PRECONDITION
        assert "wire_dtype" in caught.value.message and source.num_reads == 0
        assert receiver.num_pending == 1 and done.results == []
        receiver.cancel("t1")
    finally:
        sender.close()
        receiver.stop()


TRANSPORTS = [
    pytest.param("inproc", {}, id="inproc"),
    pytest.param("grpc", {"side_channel": "none"}, id="grpc-inband"),
    pytest.param("grpc", {"side_channel": "tcp"}, id="grpc-tcp"),
    pytest.param("shm", {}, id="shm"),
    pytest.param("nccl", {}, id="gloo"),
]


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize(("transport", "overrides"), TRANSPORTS)
def test_round_trip_through_each_transport(
    transport: str, overrides: dict[str, str], wire_dtype: str
) -> None:
    config = KVTransferConfig(**{**CONFIG.model_dump(), **overrides, "wire_dtype": wire_dtype})
    receiver, sender = make_receiver(transport, LAYOUT, config), make_sender(transport, config)
    receiver.start()
    try:
        kv, done, spy = kv_values(LAYOUT, NUM_TOKENS, seed=3), DoneRecorder(), WireSpy()
        sink = TensorSink(kv)
        receiver.expect("t1", NUM_TOKENS, sink, done)
        stats = sender.send(address=receiver.address, transfer_id="t1", layout=LAYOUT,
                            num_tokens=NUM_TOKENS, source=TensorSource(kv), first_token_id=5,
                            cancel=threading.Event(), fault=spy)
        result = done.wait()
    finally:
        sender.close()
        receiver.stop()
    kv_bytes = LAYOUT.kv_bytes(NUM_TOKENS)
    assert stats.num_bytes == result.num_bytes == receiver.total_bytes_received == kv_bytes
    assert result.ok and result.first_token_id == 5
    assert spy.num_wire_bytes == wire_bytes(LAYOUT, wire_dtype, NUM_TOKENS) < kv_bytes
    if wire_dtype == "bfloat16":
        assert torch.equal(sink.kv, kv.to(torch.bfloat16).to(torch.float32))
    else:
        assert_int8_close(sink.kv, kv, kv.abs().amax(dim=-1) / 127)


@settings(max_examples=150, deadline=None)
@given(
    wire_dtype=st.one_of(st.sampled_from(["cache", "bfloat16", "int8", ""]), st.text(max_size=8)),
    cut=st.integers(-40, 40),
    flip=st.booleans(),
)
def test_fuzz_header_wire_dtype_and_chunk_lengths_give_typed_errors_only(
    wire_dtype: str, cut: int, flip: bool
) -> None:
    """Any header wire dtype with chunks of any length: accepted when all fit, else a typed
    error; never more than the reserved KV written, never a NaN from a valid stream."""
    messages, kv = good_stream("int8" if flip else "bfloat16")
    messages[0] = dataclasses.replace(messages[0], wire_dtype=wire_dtype)
    first = messages[1]
    assert isinstance(first, Chunk)
    data = bytes(first.data)
    data = data[:cut] if cut < 0 else data + bytes(cut)
    messages[1] = Chunk(first.spec, checksum(data), data)
    sink = TensorSink(kv)
    try:
        session, done = run_session(messages, sink)
        session.end()
    except TransferError as err:
        assert err.code in (StatusCode.DATA_LOSS, StatusCode.FAILED_PRECONDITION)
        return
    assert done.wait().ok and not torch.isnan(sink.kv).any()
