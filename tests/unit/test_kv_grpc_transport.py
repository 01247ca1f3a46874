"""Sender and receiver end to end: gRPC over 127.0.0.1 (chunk bytes on the TCP side channel,
and in-band with `side_channel: none`), shm, the in-process transport, and "nccl" (gloo on the
CPU: both ranks of the pair group in this process, on two threads)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from kvtransfer import (
    ChunkSpec,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferError,
    TransferResult,
    make_receiver,
    make_sender,
    plan_chunks,
)
from kvtransfer.grpc_codec import message_to_proto
from kvtransfer.stream import Chunk, Header, outgoing_messages
from pdserve.config import KVTransferConfig
from pdserve.errors import StatusCode
from pdserve.internal.v1 import kv_transfer_pb2_grpc

LAYOUT = KVLayout("fp-test", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32")
# A token row is 256 bytes: 16 tokens per 4 KiB chunk, so 37 tokens make 3 chunks per layer.
CONFIG = KVTransferConfig(chunk_bytes=4096, max_message_bytes=128 * 1024, timeout_s=10.0)
NUM_TOKENS = 37
WAIT_S = 10.0
# "grpc-inband": transport "grpc" with the chunk bytes inside the gRPC messages; "grpc" runs with
# the default TCP side channel.
INBAND_CONFIG = KVTransferConfig(**{**CONFIG.model_dump(), "side_channel": "none"})


def transport_config(transport: str) -> tuple[str, KVTransferConfig]:
    """The transport name and config a test parameter stands for."""
    if transport == "grpc-inband":
        return "grpc", INBAND_CONFIG
    return transport, CONFIG


class ArraySource:
    """KV held as two numpy arrays [layers, tokens, heads, dim]; reads may be gated."""

    def __init__(self, layout: KVLayout, num_tokens: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        shape = (layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim)
        self.keys = rng.standard_normal(shape, dtype=np.float32)
        self.values = rng.standard_normal(shape, dtype=np.float32)
        self.num_reads = 0
        self.gate_seq: int | None = None
        self.gate = threading.Event()
        self.reached_gate = threading.Event()

    def read(self, chunk: ChunkSpec) -> memoryview:
        if chunk.seq == self.gate_seq:
            self.reached_gate.set()
            self.gate.wait(WAIT_S)
        self.num_reads += 1
        block = np.s_[chunk.layer_start : chunk.layer_end, chunk.token_start : chunk.token_end]
        data = np.concatenate([self.keys[block].ravel(), self.values[block].ravel()])
        return memoryview(data).cast("B")


class ArraySink:
    def __init__(self, layout: KVLayout, num_tokens: int) -> None:
        shape = (layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim)
        self.keys = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.num_writes = 0
        self.written = threading.Event()

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        block = np.s_[chunk.layer_start : chunk.layer_end, chunk.token_start : chunk.token_end]
        flat = np.frombuffer(data, dtype=np.float32)
        half = flat.size // 2
        self.keys[block] = flat[:half].reshape(self.keys[block].shape)
        self.values[block] = flat[half:].reshape(self.values[block].shape)
        self.num_writes += 1
        self.written.set()


class DoneRecorder:
    def __init__(self) -> None:
        self.results: list[TransferResult] = []
        self.called = threading.Event()

    def __call__(self, result: TransferResult) -> None:
        self.results.append(result)
        self.called.set()

    def wait(self) -> TransferResult:
        assert self.called.wait(WAIT_S), "on_done was not called"
        [result] = self.results
        return result


# What TransferStats.transport reports: "nccl" runs gloo when the KV is on the CPU.
REPORTED_TRANSPORT = {"nccl": "gloo", "grpc-inband": "grpc"}


@pytest.fixture(params=["grpc", "grpc-inband", "shm", "inproc", "nccl"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def receiver(transport: str) -> Iterator[KVReceiver]:
    name, config = transport_config(transport)
    receiver = make_receiver(name, LAYOUT, config)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def sender(transport: str) -> Iterator[KVSender]:
    sender = make_sender(*transport_config(transport))
    yield sender
    sender.close()


def send(sender: KVSender, receiver: KVReceiver, transfer_id: str, source: ArraySource,
         **kwargs: object) -> object:
    return sender.send(address=receiver.address, transfer_id=transfer_id, layout=LAYOUT,
                       num_tokens=NUM_TOKENS, source=source, first_token_id=7,
                       **kwargs)  # type: ignore[arg-type]


def assert_good_transfer(sender: KVSender, receiver: KVReceiver, transfer_id: str) -> None:
    """A transfer after whatever happened before succeeds and arrives byte for byte."""
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS, seed=9), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect(transfer_id, NUM_TOKENS, sink, done)
    stats = send(sender, receiver, transfer_id, source)
    assert stats.num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)  # type: ignore[attr-defined]
    assert done.wait().ok
    np.testing.assert_array_equal(sink.keys, source.keys)
    np.testing.assert_array_equal(sink.values, source.values)
    assert receiver.num_pending == 0


def test_round_trip_moves_every_byte(sender: KVSender, receiver: KVReceiver,
                                     transport: str) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    assert receiver.num_pending == 1
    stats = sender.send(address=receiver.address, transfer_id="t1", layout=LAYOUT,
                        num_tokens=NUM_TOKENS, source=source, first_token_id=1234)
    num_chunks = len(plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes))
    reported = REPORTED_TRANSPORT.get(transport, transport)
    assert (stats.transfer_id, stats.num_chunks, stats.transport) == ("t1", num_chunks, reported)
    assert stats.num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)
    result = done.wait()
    assert result.ok and result.first_token_id == 1234
    assert result.num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)
    np.testing.assert_array_equal(sink.keys, source.keys)
    np.testing.assert_array_equal(sink.values, source.values)
    assert sink.num_writes == num_chunks == 12
    assert receiver.num_pending == 0
    assert receiver.total_bytes_received == LAYOUT.kv_bytes(NUM_TOKENS)
    if transport.startswith("grpc"):
        # Which path the bytes took is observable, and "grpc" took the side channel.
        expected_side_channel = "tcp" if transport == "grpc" else "none"
        assert sender.side_channel == expected_side_channel  # type: ignore[attr-defined]
        assert sender.num_side_channel_transfers == (  # type: ignore[attr-defined]
            1 if transport == "grpc" else 0
        )
    assert_good_transfer(sender, receiver, "t2")


def test_handshake_mismatch_moves_no_bytes(sender: KVSender, receiver: KVReceiver) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    other = KVLayout("fp-test", num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16")
    with pytest.raises(TransferError) as caught:
        sender.send(address=receiver.address, transfer_id="t1", layout=other,
                    num_tokens=NUM_TOKENS, source=source, first_token_id=1)
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert "dtype: sender bfloat16, receiver float32" in caught.value.message
    assert source.num_reads == 0 and sink.num_writes == 0
    # The handshake does not consume the reservation: the decode side cancels it.
    assert receiver.num_pending == 1 and done.results == []
    receiver.cancel("t1")
    assert receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def test_unknown_transfer_id_is_not_found(sender: KVSender, receiver: KVReceiver) -> None:
    with pytest.raises(TransferError) as caught:
        send(sender, receiver, "nobody-expects-me", ArraySource(LAYOUT, NUM_TOKENS))
    assert caught.value.code is StatusCode.NOT_FOUND
    assert_good_transfer(sender, receiver, "t2")


def test_wrong_num_tokens_fails_both_sides(sender: KVSender, receiver: KVReceiver) -> None:
    sink, done = ArraySink(LAYOUT, NUM_TOKENS + 1), DoneRecorder()
    receiver.expect("t1", NUM_TOKENS + 1, sink, done)
    with pytest.raises(TransferError) as caught:
        send(sender, receiver, "t1", ArraySource(LAYOUT, NUM_TOKENS))
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    result = done.wait()
    assert not result.ok and result.error is not None
    assert result.error.code is StatusCode.FAILED_PRECONDITION
    assert sink.num_writes == 0 and receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def _send_in_thread(sender: KVSender, receiver: KVReceiver, source: ArraySource,
                    **kwargs: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            send(sender, receiver, "t1", source, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_sender_cancel_is_prompt_while_the_source_blocks(sender: KVSender,
                                                         receiver: KVReceiver) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    source.gate_seq = 3
    receiver.expect("t1", NUM_TOKENS, sink, done)
    cancel = threading.Event()
    thread, errors = _send_in_thread(sender, receiver, source, cancel=cancel)
    # Once the sink was written the receiver has the transfer in progress.
    assert source.reached_gate.wait(WAIT_S) and sink.written.wait(WAIT_S)
    cancel.set()
    # The source is still blocked: send must return anyway.
    thread.join(WAIT_S)
    assert not thread.is_alive()
    [error] = errors
    assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
    result = done.wait()
    assert not result.ok and result.error is not None
    num_writes = sink.num_writes
    assert num_writes <= 3
    source.gate.set()
    assert receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")
    assert sink.num_writes == num_writes


def test_sender_cancel_fails_the_transfer(sender: KVSender, receiver: KVReceiver) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    source.gate_seq = 3
    receiver.expect("t1", NUM_TOKENS, sink, done)
    cancel = threading.Event()
    thread, errors = _send_in_thread(sender, receiver, source, cancel=cancel)
    # Once the sink was written the receiver has the transfer in progress.
    assert source.reached_gate.wait(WAIT_S) and sink.written.wait(WAIT_S)
    cancel.set()
    source.gate.set()
    thread.join(WAIT_S)
    [error] = errors
    assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
    assert not done.wait().ok
    assert sink.num_writes <= 3
    assert receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def test_receiver_cancel_mid_push_fails_the_sender(sender: KVSender,
                                                   receiver: KVReceiver) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    source.gate_seq = 3
    receiver.expect("t1", NUM_TOKENS, sink, done)
    thread, errors = _send_in_thread(sender, receiver, source)
    # Once the sink was written the receiver has the transfer in progress.
    assert source.reached_gate.wait(WAIT_S) and sink.written.wait(WAIT_S)
    receiver.cancel("t1")
    num_writes = sink.num_writes
    assert receiver.num_pending == 0
    source.gate.set()
    thread.join(WAIT_S)
    [error] = errors
    assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
    assert_good_transfer(sender, receiver, "t2")
    # After cancel the sink was never written again and on_done never called.
    assert sink.num_writes == num_writes and done.results == []


def test_timeout_is_deadline_exceeded(sender: KVSender, receiver: KVReceiver) -> None:
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    source.gate_seq = 1
    receiver.expect("t1", NUM_TOKENS, sink, done)
    try:
        with pytest.raises(TransferError) as caught:
            send(sender, receiver, "t1", source, timeout_s=1.0)
    finally:
        source.gate.set()
    assert caught.value.code is StatusCode.DEADLINE_EXCEEDED
    assert not done.wait().ok
    assert receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def test_source_error_fails_both_sides(sender: KVSender, receiver: KVReceiver) -> None:
    sink, done = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()

    class FailingSource(ArraySource):
        def read(self, chunk: ChunkSpec) -> memoryview:
            if chunk.seq == 2:
                # Fail only once the receiver has the transfer in progress.
                assert sink.written.wait(WAIT_S)
                raise RuntimeError("lease expired")
            return super().read(chunk)

    receiver.expect("t1", NUM_TOKENS, sink, done)
    with pytest.raises(TransferError, match="lease expired") as caught:
        send(sender, receiver, "t1", FailingSource(LAYOUT, NUM_TOKENS))
    assert caught.value.code is StatusCode.INTERNAL
    assert not done.wait().ok
    assert sink.num_writes <= 2 and receiver.num_pending == 0
    assert_good_transfer(sender, receiver, "t2")


def test_unreachable_peer_is_unavailable(sender: KVSender, transport: str) -> None:
    name, config = transport_config(transport)
    gone = make_receiver(name, LAYOUT, config)
    gone.start()
    address = gone.address
    gone.stop()
    with pytest.raises(TransferError) as caught:
        sender.send(address=address, transfer_id="t1", layout=LAYOUT, num_tokens=NUM_TOKENS,
                    source=ArraySource(LAYOUT, NUM_TOKENS), first_token_id=1, timeout_s=5.0)
    assert caught.value.code is StatusCode.UNAVAILABLE


def test_stop_fails_pending_transfers(transport: str) -> None:
    name, config = transport_config(transport)
    receiver = make_receiver(name, LAYOUT, config)
    receiver.start()
    done = DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), done)
    receiver.stop()
    result = done.wait()
    assert result.error is not None and result.error.code is StatusCode.UNAVAILABLE
    assert receiver.num_pending == 0


@pytest.mark.parametrize("transport", ["grpc"])
def test_corrupted_chunk_on_the_wire_is_data_loss(sender: KVSender,
                                                  receiver: KVReceiver) -> None:
    sink, done = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    chunks = plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes)
    header = Header("t1", LAYOUT, NUM_TOKENS, len(chunks))
    messages = outgoing_messages(header, chunks, ArraySource(LAYOUT, NUM_TOKENS), 1, lambda: False)
    protos = []
    for message in messages:
        proto = message_to_proto(message)
        if isinstance(message, Chunk) and message.spec.seq == 1:
            proto.chunk.crc32c ^= 1
        protos.append(proto)
    with grpc.insecure_channel(receiver.address) as channel:
        stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Push(iter(protos), timeout=WAIT_S)
    assert caught.value.code() is grpc.StatusCode.DATA_LOSS
    assert "crc32c" in caught.value.details()
    assert not done.wait().ok and sink.num_writes == 1
    assert_good_transfer(sender, receiver, "t2")


def test_unknown_transport_names_the_choices() -> None:
    with pytest.raises(ValueError, match="grpc, shm, inproc, nccl"):
        make_sender("pigeon", CONFIG)
    with pytest.raises(ValueError, match="grpc, shm, inproc, nccl"):
        make_receiver("pigeon", LAYOUT, CONFIG)
