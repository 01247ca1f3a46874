"""A receiver's TCP side channel against hand-made peers: tickets that are wrong, reused,
unknown or missing are refused, hand-made pushes that break the rules fail with typed errors
on both sides, a receiver cancel wakes a blocked read, and the receiver keeps serving."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import make_receiver, make_sender, plan_chunks
from kvtransfer.checksum import checksum
from kvtransfer.grpc_codec import (
    encode_message,
    encode_side_channel_commit,
    encode_side_channel_header,
)
from kvtransfer.grpc_receiver import GrpcReceiver
from kvtransfer.stream import Chunk, Commit, Header
from kvtransfer.tcp_frames import ACCEPT, encode_frame, encode_hello
from pdserve.config import KVTransferConfig
from pdserve.internal.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc
from tests.unit.test_kv_grpc_transport import (
    CONFIG,
    INBAND_CONFIG,
    LAYOUT,
    NUM_TOKENS,
    WAIT_S,
    ArraySink,
    ArraySource,
    DoneRecorder,
    assert_good_transfer,
)
from tests.unit.test_kv_tcp_side_channel import closed_without_answer

PUSH = "/pdserve.internal.v1.KVTransfer/Push"
CHUNKS = plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes)


@pytest.fixture
def receiver() -> Iterator[GrpcReceiver]:
    receiver = make_receiver("grpc", LAYOUT, CONFIG)
    assert isinstance(receiver, GrpcReceiver)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def short_receiver() -> Iterator[GrpcReceiver]:
    """A receiver that gives up waiting for a ticket's connection after one second."""
    receiver = make_receiver("grpc", LAYOUT, KVTransferConfig(**{**CONFIG.model_dump(),
                                                                 "timeout_s": 1.0}))
    assert isinstance(receiver, GrpcReceiver)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def stub(receiver: GrpcReceiver) -> Iterator[kv_transfer_pb2_grpc.KVTransferStub]:
    with grpc.insecure_channel(receiver.address) as channel:
        yield kv_transfer_pb2_grpc.KVTransferStub(channel)


def ticket_for(stub: kv_transfer_pb2_grpc.KVTransferStub, transfer_id: str) -> bytes:
    reply = stub.OpenSideChannel(kv_transfer_pb2.SideChannelRequest(transfer_id=transfer_id),
                                 timeout=WAIT_S)
    assert reply.ttl_ms > 0 and len(reply.ticket) == 32
    return bytes(reply.ticket)


def connect(receiver: GrpcReceiver, first_bytes: bytes) -> socket.socket:
    host, _, port = receiver.side_channel_address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.sendall(first_bytes)
    return sock


def accepted(sock: socket.socket) -> bool:
    answer = b""
    while len(answer) < len(ACCEPT):
        part = sock.recv(len(ACCEPT) - len(answer))
        if not part:
            return False
        answer += part
    return answer == ACCEPT


def test_only_a_fresh_ticket_of_the_transfer_is_accepted(
    receiver: GrpcReceiver, stub: kv_transfer_pb2_grpc.KVTransferStub
) -> None:
    side = receiver._side
    assert side is not None
    refused_before = side.listener.num_refused
    ticket = ticket_for(stub, "t1")
    other = ticket_for(stub, "t2")
    refused = [
        connect(receiver, encode_hello("t1", bytes(len(ticket)))),  # wrong ticket
        connect(receiver, encode_hello("t1", other)),  # another transfer's ticket
        connect(receiver, encode_hello("nobody", ticket)),  # unknown transfer
        connect(receiver, b"GET / HTTP/1.1\r\n\r\n" + bytes(40)),  # no hello at all
    ]
    good = connect(receiver, encode_hello("t1", ticket))
    assert accepted(good)
    reused = connect(receiver, encode_hello("t1", ticket))
    truncated = connect(receiver, encode_hello("t2", other)[:20])
    truncated.shutdown(socket.SHUT_WR)  # missing the rest of its hello
    for sock in [*refused, reused, truncated]:
        assert closed_without_answer(sock)
        sock.close()
    assert side.listener.num_refused == refused_before + 6
    # t1 parked, t2 still waiting for its connection; the refusals allocated nothing.
    assert side.tickets.num_entries == 2 and side.buffers.num_allocated == 0
    assert_served(receiver, "after-refusals")
    # A new ticket for the same transfer replaces the old one and closes what it admitted.
    ticket_for(stub, "t1")
    assert closed_without_answer(good)
    good.close()


def assert_served(receiver: GrpcReceiver, transfer_id: str) -> None:
    sender = make_sender("grpc", CONFIG)
    try:
        assert_good_transfer(sender, receiver, transfer_id)
    finally:
        sender.close()


def test_open_side_channel_refusals() -> None:
    plain = make_receiver("grpc", LAYOUT, INBAND_CONFIG)
    token = "kv-peer-token-1234567890abcdef"
    guarded = make_receiver("grpc", LAYOUT, KVTransferConfig(**{**CONFIG.model_dump(),
                                                                "auth_token": token}))
    for receiver in (plain, guarded):
        receiver.start()
    try:
        cases = [(plain, "t", grpc.StatusCode.FAILED_PRECONDITION),
                 (guarded, "t", grpc.StatusCode.UNAUTHENTICATED)]
        for receiver, transfer_id, status in cases:
            with grpc.insecure_channel(receiver.address) as channel:
                stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    ticket_for(stub, transfer_id)
                assert caught.value.code() is status
    finally:
        plain.stop()
        guarded.stop()


def test_malformed_transfer_id_gets_no_ticket(stub: kv_transfer_pb2_grpc.KVTransferStub) -> None:
    for transfer_id in ("", "x" * 300):
        with pytest.raises(grpc.RpcError) as caught:
            ticket_for(stub, transfer_id)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION


def frame(chunk_index: int, source: ArraySource) -> tuple[int, bytes]:
    """The CRC32C and the frame (header and payload) of one chunk of `source`."""
    spec = CHUNKS[chunk_index]
    data = bytes(source.read(spec))
    crc = checksum(data)
    return crc, encode_frame(spec, crc, len(data)) + data


def push(receiver: GrpcReceiver, messages: Iterable[bytes]) -> grpc.RpcError | None:
    """A hand-made push; returns its error (None when it succeeded)."""
    with grpc.insecure_channel(receiver.address) as channel:
        call = channel.stream_unary(PUSH, request_serializer=None,
                                    response_deserializer=kv_transfer_pb2.PushReply.FromString)
        try:
            call(iter(messages), timeout=WAIT_S)
        except grpc.RpcError as err:
            return err
    return None


def side_header(transfer_id: str, num_chunks: int = len(CHUNKS)) -> bytes:
    return encode_side_channel_header(Header(transfer_id, LAYOUT, NUM_TOKENS, num_chunks))


def commit(crc32cs: list[int]) -> bytes:
    return encode_side_channel_commit(Commit(len(crc32cs), 1), crc32cs)


def test_hand_made_push_by_the_rules_succeeds(
    receiver: GrpcReceiver, stub: kv_transfer_pb2_grpc.KVTransferStub
) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("good", NUM_TOKENS, sink, done)
    sock = connect(receiver, encode_hello("good", ticket_for(stub, "good")))
    assert accepted(sock)
    frames = [frame(index, source) for index in range(len(CHUNKS))]
    sock.sendall(b"".join(data for _, data in frames))
    assert push(receiver, [side_header("good"), commit([crc for crc, _ in frames])]) is None
    assert done.wait().ok and sink.num_writes == len(CHUNKS)
    assert (sink.keys == source.keys).all() and (sink.values == source.values).all()
    sock.close()


# How each hand-made push breaks the rules, and the status both sides get.
BROKEN_PUSHES = {
    "reordered": grpc.StatusCode.DATA_LOSS,
    "truncated": grpc.StatusCode.DATA_LOSS,
    "missing_frame": grpc.StatusCode.DATA_LOSS,
    "commit_checksums_differ": grpc.StatusCode.DATA_LOSS,
    "chunk_message_too": grpc.StatusCode.DATA_LOSS,
    "no_connection": grpc.StatusCode.FAILED_PRECONDITION,
}


@pytest.mark.parametrize("case", sorted(BROKEN_PUSHES))
def test_hand_made_push_breaking_the_rules_fails_both_sides(
    short_receiver: GrpcReceiver, case: str
) -> None:
    receiver = short_receiver
    transfer_id = f"bad-{case}"
    sink, done, source = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder(), ArraySource(LAYOUT,
                                                                                    NUM_TOKENS)
    receiver.expect(transfer_id, NUM_TOKENS, sink, done)
    frames = [frame(index, source) for index in range(len(CHUNKS))]
    crcs = [crc for crc, _ in frames]
    payloads = [data for _, data in frames]
    messages = [side_header(transfer_id), commit(crcs)]
    sock = None
    if case != "no_connection":
        with grpc.insecure_channel(receiver.address) as channel:
            ticket = ticket_for(kv_transfer_pb2_grpc.KVTransferStub(channel), transfer_id)
        sock = connect(receiver, encode_hello(transfer_id, ticket))
        assert accepted(sock)
    if case == "reordered":
        payloads[0], payloads[1] = payloads[1], payloads[0]
    elif case == "truncated":
        payloads = [payloads[0], payloads[1][: len(payloads[1]) // 2]]
    elif case == "missing_frame":
        del payloads[-1]
    elif case == "commit_checksums_differ":
        messages[1] = commit([crcs[1], crcs[0], *crcs[2:]])
    elif case == "chunk_message_too":
        data = bytes(source.read(CHUNKS[0]))
        messages.insert(1, encode_message(Chunk(CHUNKS[0], checksum(data), data)))
    if sock is not None:
        sock.sendall(b"".join(payloads))
        # The frames end here: a receiver still expecting one sees the end of the stream.
        sock.shutdown(socket.SHUT_WR)
    error = push(receiver, messages)
    expected = BROKEN_PUSHES[case]
    assert error is not None and error.code() is expected, error
    result = done.wait()
    assert result.error is not None and result.error.code.value == expected.name
    assert receiver.num_pending == 0
    if sock is not None:
        assert closed_without_answer(sock)
        sock.close()
    assert receiver._side is not None and receiver._side.tickets.num_entries == 0
    assert_served(receiver, f"after-{case}")


def test_receiver_cancel_wakes_a_read_blocked_on_the_side_channel(
    receiver: GrpcReceiver, stub: kv_transfer_pb2_grpc.KVTransferStub
) -> None:
    sink, done = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()
    receiver.expect("stuck", NUM_TOKENS, sink, done)
    sock = connect(receiver, encode_hello("stuck", ticket_for(stub, "stuck")))
    assert accepted(sock)
    hold = threading.Event()

    def messages() -> Iterator[bytes]:
        yield side_header("stuck")  # no frame comes: the receiver blocks reading one
        hold.wait(WAIT_S)

    errors: list[grpc.RpcError | None] = []
    thread = threading.Thread(target=lambda: errors.append(push(receiver, messages())))
    thread.start()
    try:
        # The receiver has the transfer in progress once its ticket's connection is claimed.
        assert _wait_for(lambda: receiver._side is not None
                         and receiver._side.tickets.num_entries == 0)
        receiver.cancel("stuck")
        # Woken, the push closed its connection (we never sent the frames it waited for).
        assert closed_without_answer(sock)
        thread.join(WAIT_S)
    finally:
        hold.set()
        sock.close()
    [error] = errors
    assert error is not None and error.code() is grpc.StatusCode.CANCELLED
    assert done.results == [] and sink.num_writes == 0 and receiver.num_pending == 0
    assert_served(receiver, "after-stuck")


def _wait_for(condition: object) -> bool:
    event = threading.Event()
    for _ in range(int(WAIT_S / 0.01)):
        if condition():  # type: ignore[operator]
            return True
        event.wait(0.01)
    return False


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(min_size=0, max_size=200))
def test_arbitrary_bytes_never_get_a_connection_admitted(
    receiver: GrpcReceiver, garbage: bytes
) -> None:
    sock = connect(receiver, garbage)
    sock.shutdown(socket.SHUT_WR)
    assert closed_without_answer(sock)
    sock.close()
    assert receiver._side is not None and receiver._side.tickets.num_entries == 0

