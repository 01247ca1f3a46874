"""Fuzzing the KV receiver: whatever a peer sends, the receiver answers with a typed error (or
accepts a valid stream), never another exception, never a hang, never a write beyond the
reserved KV; and it keeps serving good transfers afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import (
    ChunkSpec,
    KVLayout,
    KVReceiver,
    TransferError,
    make_receiver,
    make_sender,
)
from kvtransfer.receive_session import ReceiveSession
from kvtransfer.shm_segment import ShmRef
from kvtransfer.stream import Chunk, Commit, Header
from kvtransfer.transfer_table import Expectation, TransferTable
from pdserve.internal.v1 import kv_transfer_pb2
from tests.unit.test_kv_grpc_transport import CONFIG as GOOD_CONFIG
from tests.unit.test_kv_grpc_transport import LAYOUT as GOOD_LAYOUT
from tests.unit.test_kv_grpc_transport import DoneRecorder, assert_good_transfer

LAYOUT = KVLayout("fuzz", num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32")
NUM_TOKENS = 5
RESERVED_BYTES = LAYOUT.kv_bytes(NUM_TOKENS)


class CountingSink:
    """Records how many bytes the receiver wrote; never more than the reservation."""

    def __init__(self) -> None:
        self.num_bytes = 0

    def write(self, chunk: object, data: memoryview) -> None:
        self.num_bytes += data.nbytes


small_ints = st.integers(min_value=0, max_value=12)
layouts = st.builds(
    KVLayout,
    model_fingerprint=st.sampled_from(["fuzz", "other"]),
    num_layers=st.integers(1, 3),
    num_kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([4, 8]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
headers = st.builds(
    Header,
    transfer_id=st.sampled_from(["t", "unknown"]),
    layout=st.one_of(st.just(LAYOUT), layouts),
    num_tokens=st.integers(0, 8),
    num_chunks=st.integers(0, 12),
)
chunk_specs = st.builds(ChunkSpec, small_ints, small_ints, small_ints, small_ints, small_ints)
chunks = st.builds(
    Chunk,
    spec=chunk_specs,
    crc32c=st.integers(0, 2**32 - 1),
    data=st.binary(max_size=256),
    shm=st.one_of(st.none(), st.builds(ShmRef, st.text(max_size=40), small_ints, small_ints)),
)
commits = st.builds(Commit, num_chunks=small_ints, first_token_id=st.integers(-5, 100))
streams = st.lists(st.one_of(headers, chunks, commits), max_size=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams)
def test_any_message_sequence_yields_only_typed_errors(messages: list) -> None:
    table = TransferTable()
    sink = CountingSink()
    done = DoneRecorder()
    table.expect(Expectation("t", NUM_TOKENS, sink, done))
    session = ReceiveSession(table, LAYOUT, abort_stream=lambda: None, allow_shm=True)
    try:
        for message in messages:
            session.handle(message)
        session.end()
    except TransferError:
        pass  # the typed failure; anything else fails the test
    finally:
        session.close()
    assert sink.num_bytes <= RESERVED_BYTES
    # Ended one way or another, the reservation is settled or still claimable, never stuck.
    if done.called.is_set():
        assert len(done.results) == 1


@pytest.fixture(scope="module")
def fuzz_receiver() -> Iterator[KVReceiver]:
    receiver = make_receiver("grpc", LAYOUT, GOOD_CONFIG)
    receiver.start()
    yield receiver
    receiver.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_arbitrary_bytes_on_the_wire_never_break_the_grpc_receiver(
    fuzz_receiver: KVReceiver, frames: list[bytes]
) -> None:
    receiver = fuzz_receiver
    with grpc.insecure_channel(receiver.address) as channel:
        push = channel.stream_unary(
            "/pdserve.internal.v1.KVTransfer/Push",
            request_serializer=None,
            response_deserializer=kv_transfer_pb2.PushReply.FromString,
        )
        try:
            push(iter(frames), timeout=5.0)
        except grpc.RpcError as err:
            # Garbage is refused: by our validation (typed statuses) or by protobuf
            # itself before our code runs (gRPC's INTERNAL for undecodable bytes).
            assert err.code() in {
                grpc.StatusCode.DATA_LOSS,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INTERNAL,
            }, err
    assert receiver.num_pending == 0


def test_receiver_serves_a_good_transfer_after_garbage() -> None:
    receiver = make_receiver("grpc", GOOD_LAYOUT, GOOD_CONFIG)
    receiver.start()
    sender = make_sender("grpc", GOOD_CONFIG)
    try:
        with grpc.insecure_channel(receiver.address) as channel:
            push = channel.stream_unary(
                "/pdserve.internal.v1.KVTransfer/Push", request_serializer=None,
                response_deserializer=kv_transfer_pb2.PushReply.FromString,
            )
            for garbage in (b"\xff" * 50, b"\x0a\x05hello", b""):
                with contextlib.suppress(grpc.RpcError):
                    push(iter([garbage]), timeout=5.0)
        assert_good_transfer(sender, receiver, "after-garbage")
    finally:
        sender.close()
        receiver.stop()
