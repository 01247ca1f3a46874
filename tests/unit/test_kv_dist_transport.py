"""The "nccl" transport across two processes: the receiver runs in a spawned child driven
through a Pipe (msgpack-encoded lists of ints, strings and bytes), the sender here. On the CPU
the pair group is gloo; the NCCL variant needs two GPUs."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import grpc
import msgpack
import pytest
import torch

from kvtransfer import (
    KVReceiver,
    KVSender,
    TransferError,
    make_receiver,
    make_sender,
    plan_chunks,
)
from kvtransfer.dist_group import PairGroup
from kvtransfer.grpc_codec import message_to_proto
from kvtransfer.stream import Chunk, Header, outgoing_messages
from pdserve.errors import StatusCode
from pdserve.internal.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc
from tests.unit.test_kv_grpc_transport import (
    CONFIG,
    LAYOUT,
    NUM_TOKENS,
    WAIT_S,
    ArraySink,
    ArraySource,
    DoneRecorder,
)


def _receiver_main(conn: Connection, kv_device: str) -> None:
    """The decode side, in its own process: answers one command at a time until "stop"."""
    receiver = make_receiver("nccl", LAYOUT, CONFIG, kv_device=kv_device)
    receiver.start()
    sinks: dict[str, ArraySink] = {}
    dones: dict[str, DoneRecorder] = {}
    _put(conn, [receiver.address])
    while True:
        command, *args = _get(conn)
        try:
            reply = _serve(receiver, sinks, dones, command, args)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            reply = ["error", repr(exc)]
        _put(conn, reply)
        if command == "stop":
            return


def _serve(receiver: Any, sinks: dict[str, ArraySink], dones: dict[str, DoneRecorder],
           command: str, args: list[Any]) -> list[Any]:
    if command == "expect":
        [transfer_id] = args
        sinks[transfer_id], dones[transfer_id] = ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()
        receiver.expect(transfer_id, NUM_TOKENS, sinks[transfer_id], dones[transfer_id])
        return ["ok"]
    if command == "wait_written":
        return [sinks[args[0]].written.wait(WAIT_S)]
    if command == "result":
        result = dones[args[0]].wait()
        code = "" if result.error is None else result.error.code.value
        return [result.ok, code, result.num_bytes, result.first_token_id]
    if command == "sink_bytes":
        sink = sinks[args[0]]
        return [sink.keys.tobytes(), sink.values.tobytes(), sink.num_writes]
    if command == "cancel":
        receiver.cancel(args[0])
        return [sinks[args[0]].num_writes]
    if command == "state":
        return [receiver.num_groups_built, receiver.num_open_groups, receiver.num_pending]
    if command == "stop":
        receiver.stop()
        return ["ok"]
    raise ValueError(f"unknown command {command!r}")


def _put(conn: Connection, message: list[Any]) -> None:
    conn.send_bytes(msgpack.packb(message, use_bin_type=True))


def _get(conn: Connection) -> list[Any]:
    message: list[Any] = msgpack.unpackb(conn.recv_bytes(), raw=False)
    return message


class Peer:
    """The receiver process, seen from the test."""

    def __init__(self, kv_device: str = "cpu") -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=_receiver_main, args=(child_conn, kv_device),
                                       daemon=True)
        self.process.start()
        child_conn.close()
        [self.address] = self._reply()

    def ask(self, *command: Any) -> list[Any]:
        _put(self._conn, list(command))
        return self._reply()

    def state(self) -> tuple[int, int, int]:
        """(groups built, groups open, transfers pending) on the receiver."""
        built, open_, pending = self.ask("state")
        return built, open_, pending

    def close(self) -> None:
        if self.process.is_alive():
            self.ask("stop")
        self.process.join(WAIT_S)
        if self.process.is_alive():
            self.process.kill()

    def _reply(self) -> list[Any]:
        if not self._conn.poll(60):
            raise TimeoutError("the receiver process did not answer")
        reply = _get(self._conn)
        if reply and reply[0] == "error":
            raise AssertionError(f"receiver process: {reply[1]}")
        return reply


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    peer = Peer()
    yield peer
    peer.close()


@pytest.fixture
def sender() -> Iterator[KVSender]:
    sender = make_sender("nccl", CONFIG)
    yield sender
    sender.close()


def send(sender: KVSender, peer: Peer | KVReceiver, transfer_id: str, source: ArraySource,
         **kwargs: Any) -> Any:
    return sender.send(address=peer.address, transfer_id=transfer_id, layout=LAYOUT,
                       num_tokens=NUM_TOKENS, source=source, first_token_id=11, **kwargs)


def assert_transfer_arrives(sender: KVSender, peer: Peer, transfer_id: str, seed: int) -> None:
    source = ArraySource(LAYOUT, NUM_TOKENS, seed=seed)
    peer.ask("expect", transfer_id)
    stats = send(sender, peer, transfer_id, source)
    assert stats.transport == "gloo"
    assert stats.num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)
    assert peer.ask("result", transfer_id) == [True, "", LAYOUT.kv_bytes(NUM_TOKENS), 11]
    keys, values, num_writes = peer.ask("sink_bytes", transfer_id)
    assert keys == source.keys.tobytes() and values == source.values.tobytes()
    assert num_writes == len(plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes))


def send_in_thread(sender: KVSender, peer: Peer | KVReceiver, transfer_id: str,
                   source: ArraySource,
                   **kwargs: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            send(sender, peer, transfer_id, source, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_two_transfers_arrive_bit_identical_over_one_group(sender: Any, peer: Peer) -> None:
    built_before, open_before, _ = peer.state()
    assert_transfer_arrives(sender, peer, "reuse-1", seed=1)
    assert_transfer_arrives(sender, peer, "reuse-2", seed=2)
    assert sender.num_groups_built == 1 and sender.num_open_groups == 1
    built, open_, pending = peer.state()
    assert (built - built_before, open_ - open_before, pending) == (1, 1, 0)


def test_sender_cancel_fails_cleanly_and_the_next_transfer_works(sender: Any,
                                                                peer: Peer) -> None:
    assert_transfer_arrives(sender, peer, "scancel-0", seed=3)
    built_before, _, _ = peer.state()
    source = ArraySource(LAYOUT, NUM_TOKENS)
    source.gate_seq = 3
    peer.ask("expect", "scancel-1")
    cancel = threading.Event()
    thread, errors = send_in_thread(sender, peer, "scancel-1", source, cancel=cancel)
    try:
        assert source.reached_gate.wait(WAIT_S) and peer.ask("wait_written", "scancel-1") == [True]
        cancel.set()
        thread.join(WAIT_S)
    finally:
        source.gate.set()
    [error] = errors
    assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
    ok, code, _, _ = peer.ask("result", "scancel-1")
    assert not ok and code == "CANCELLED"
    # Both sides tore the group down; the next transfer builds a new one.
    assert sender.num_open_groups == 0
    assert_transfer_arrives(sender, peer, "scancel-2", seed=4)
    assert sender.num_groups_built == 2
    built, _, pending = peer.state()
    assert (built - built_before, pending) == (1, 0)


def test_receiver_cancel_fails_the_sender_and_the_next_transfer_works(sender: Any,
                                                                     peer: Peer) -> None:
    source = ArraySource(LAYOUT, NUM_TOKENS)
    source.gate_seq = 3
    peer.ask("expect", "rcancel-1")
    thread, errors = send_in_thread(sender, peer, "rcancel-1", source)
    try:
        assert source.reached_gate.wait(WAIT_S) and peer.ask("wait_written", "rcancel-1") == [True]
        [num_writes] = peer.ask("cancel", "rcancel-1")
    finally:
        source.gate.set()
    thread.join(WAIT_S)
    [error] = errors
    assert isinstance(error, TransferError) and error.code is StatusCode.CANCELLED
    assert_transfer_arrives(sender, peer, "rcancel-2", seed=5)
    assert sender.num_groups_built == 2 and sender.num_open_groups == 1
    # Cancelled: the sink was not written again.
    assert peer.ask("sink_bytes", "rcancel-1")[2] == num_writes
    assert peer.state()[2] == 0


def test_a_dead_receiver_fails_the_send_and_tears_the_group_down(sender: Any) -> None:
    doomed = Peer()
    source = ArraySource(LAYOUT, NUM_TOKENS)
    source.gate_seq = 3
    try:
        doomed.ask("expect", "dies-0")
        send(sender, doomed, "dies-0", ArraySource(LAYOUT, NUM_TOKENS))
        assert sender.num_open_groups == 1
        doomed.ask("expect", "dies-1")
        thread, errors = send_in_thread(sender, doomed, "dies-1", source, timeout_s=WAIT_S)
        assert source.reached_gate.wait(WAIT_S) and doomed.ask("wait_written", "dies-1") == [True]
        doomed.process.kill()
        doomed.process.join(WAIT_S)
        source.gate.set()
        thread.join(WAIT_S)
    finally:
        source.gate.set()
        doomed.close()
    [error] = errors
    assert isinstance(error, TransferError)
    assert error.code in (StatusCode.UNAVAILABLE, StatusCode.CANCELLED)
    assert sender.num_open_groups == 0


@pytest.mark.parametrize("ending", ["receiver_cancel", "deadline"])
def test_a_wait_for_withheld_bytes_ends_and_tears_both_sides_down(
        ending: str, sender: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender announces chunks but never sends their bytes: the receiver blocks in its
    group receive until it is cancelled or the deadline passes (in-process: both ranks here)."""
    receiver: Any = make_receiver("nccl", LAYOUT, CONFIG)
    receiver.start()
    try:
        done = DoneRecorder()
        receiver.expect("warm", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), done)
        sender.send(address=receiver.address, transfer_id="warm", layout=LAYOUT,
                    num_tokens=NUM_TOKENS, source=ArraySource(LAYOUT, NUM_TOKENS),
                    first_token_id=1)
        receiving = threading.Event()
        real_receive = PairGroup.receive

        def receive(self: PairGroup, *args: Any) -> memoryview:
            receiving.set()
            return real_receive(self, *args)

        monkeypatch.setattr(PairGroup, "post_send", lambda self, data, deadline: Future())
        monkeypatch.setattr(PairGroup, "receive", receive)
        done = DoneRecorder()
        receiver.expect("held", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), done)
        timeout_s = 0.5 if ending == "deadline" else WAIT_S
        thread, errors = send_in_thread(sender, receiver, "held", ArraySource(LAYOUT, NUM_TOKENS),
                                        timeout_s=timeout_s)
        assert receiving.wait(WAIT_S)
        if ending == "receiver_cancel":
            receiver.cancel("held")
        thread.join(WAIT_S)
        [error] = errors
        expected = StatusCode.CANCELLED if ending == "receiver_cancel" \
            else StatusCode.DEADLINE_EXCEEDED
        assert isinstance(error, TransferError) and error.code is expected
        if ending == "deadline":
            assert not done.wait().ok
        assert sender.num_open_groups == 0 and receiver.num_open_groups == 0
        monkeypatch.undo()
        receiver.expect("after", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
        send(sender, receiver, "after", ArraySource(LAYOUT, NUM_TOKENS))
        assert sender.num_groups_built == 2 and receiver.num_groups_built == 2
    finally:
        receiver.stop()


@pytest.mark.parametrize("transport", ["grpc", "auto"])
def test_other_receivers_refuse_group_chunks(transport: str, sender: Any) -> None:
    receiver = make_receiver(transport, LAYOUT, CONFIG)
    receiver.start()
    try:
        done = DoneRecorder()
        receiver.expect("raw", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), done)
        with grpc.insecure_channel(receiver.address) as channel:
            stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Push(iter(_group_push("raw")), timeout=WAIT_S)
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "nccl" in caught.value.details()
            request = kv_transfer_pb2.JoinGroupRequest(sender_id="s", group_id="s/1",
                                                       backend="gloo")
            with pytest.raises(grpc.RpcError) as joined:
                stub.JoinGroup(request, timeout=WAIT_S)
            assert joined.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        result = done.wait()
        assert not result.ok and result.error is not None
        assert result.error.code is StatusCode.FAILED_PRECONDITION
        receiver.expect("sent", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
        with pytest.raises(TransferError, match="does not accept the nccl transport") as refused:
            sender.send(address=receiver.address, transfer_id="sent", layout=LAYOUT,
                        num_tokens=NUM_TOKENS, source=ArraySource(LAYOUT, NUM_TOKENS),
                        first_token_id=1)
        assert refused.value.code is StatusCode.FAILED_PRECONDITION
        assert sender.num_groups_built == 0
    finally:
        receiver.stop()


def _group_push(transfer_id: str) -> list[kv_transfer_pb2.KVMessage]:
    """A push that announces its first chunk over a (made-up) pair group."""
    chunks = plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes)
    header = Header(transfer_id, LAYOUT, NUM_TOKENS, len(chunks), group_id="s/1")
    messages = outgoing_messages(header, chunks, ArraySource(LAYOUT, NUM_TOKENS), 1, lambda: False)
    protos = []
    for message in messages:
        if isinstance(message, Chunk):
            message = Chunk(spec=message.spec, crc32c=message.crc32c, data=b"", via_group=True)
        protos.append(message_to_proto(message))
    return protos


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_kv_without_cuda_is_refused_not_downgraded() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_sender("nccl", CONFIG, kv_device="cuda:0")
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_receiver("nccl", LAYOUT, CONFIG, kv_device="cuda:0")


def test_other_transports_do_not_import_torch() -> None:
    code = ("import sys, kvtransfer\n"
            "from pdserve.config import KVTransferConfig\n"
            "kvtransfer.make_sender('grpc', KVTransferConfig()).close()\n"
            "kvtransfer.make_receiver('auto', kvtransfer.KVLayout('f', 1, 1, 1, 'float32'),"
            " KVTransferConfig())\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL pair groups need two GPUs (one per rank)")
def test_nccl_moves_gpu_kv_between_two_processes() -> None:
    gpu_peer = Peer(kv_device="cuda:1")
    sender = make_sender("nccl", CONFIG, kv_device="cuda:0")
    try:
        source = ArraySource(LAYOUT, NUM_TOKENS, seed=6)
        gpu_peer.ask("expect", "gpu-1")
        stats = send(sender, gpu_peer, "gpu-1", source)
        assert stats.transport == "nccl"
        assert gpu_peer.ask("result", "gpu-1")[0] is True
        keys, values, _ = gpu_peer.ask("sink_bytes", "gpu-1")
        assert keys == source.keys.tobytes() and values == source.values.tobytes()
    finally:
        sender.close()
        gpu_peer.close()
