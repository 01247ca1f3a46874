"""The prefill replica's KV client: Handshake once per (address, layout), then one
client-streaming Push per transfer, fed lazily from the KVSource.

gRPC consumes the request iterator on its own thread; the calling thread waits for the reply
while watching the cancel event, and cancels the call itself so the receiver sees a
cancellation rather than a truncated stream.

With `kv_transfer.side_channel: tcp` (the default) the push carries only the header and the
commit (with every chunk's CRC32C), after an `OpenSideChannel` call handed out a one-time
ticket; the chunks travel as frames on a TCP connection that presented it (tcp_sender_side.py,
tcp_connection.py). The transport is still "grpc"; a side channel that cannot be opened fails
the transfer rather than falling back to in-band bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from kvtransfer.base import FirstToken, KVSender, KVSource, TransferStats
from kvtransfer.errors import TransferCancelled, TransferError, as_transfer_error
from kvtransfer.faults import ChunkFault
from kvtransfer.grpc_codec import encode_message, error_from_rpc
from kvtransfer.layout import ChunkSpec, KVLayout
from kvtransfer.peer_auth import secure_channel
from kvtransfer.shm_staging import ShmStaging
from kvtransfer.stream import (
    Header,
    Message,
    begin_send,
    check_acknowledged,
    outgoing_messages,
    via_shm,
)
from kvtransfer.tcp_sender_side import SideChannels
from pdserve.config import KVTransferConfig
from pdserve.errors import StatusCode
from pdserve.internal.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

# How often a waiting send looks at its cancel event: the bound on cancel latency.
_POLL_S = 0.02


class KVStub(kv_transfer_pb2_grpc.KVTransferStub):
    """The generated stub, plus `PushEncoded`: Push taking messages already encoded by
    `encode_message` (protobuf would copy each chunk's payload three more times)."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.PushEncoded = channel.stream_unary(
            "/pdserve.internal.v1.KVTransfer/Push",
            request_serializer=None,
            response_deserializer=kv_transfer_pb2.PushReply.FromString,
        )


class _Feeder:
    """The request iterator of one Push. Stops when cancelled or when the source fails; then it
    holds the stream open (ending it would look like a truncated push) until released."""

    def __init__(
        self, messages: Iterator[Message | bytes], cancel: threading.Event, hold_s: float
    ) -> None:
        self._messages = messages
        self._cancel = cancel
        self._hold_s = hold_s
        self._released = threading.Event()
        self.stopped = threading.Event()
        self.error: TransferError | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            for message in self._messages:
                # bytes: already encoded (a side channel push's header and commit).
                yield message if isinstance(message, bytes) else encode_message(message)
        except Exception as exc:
            self.error = as_transfer_error(exc, "sending KV")
        if self.error is None and not self._cancel.is_set():
            return
        self.stopped.set()
        self._released.wait(self._hold_s)

    def release(self) -> None:
        self._released.set()


@dataclass(frozen=True)
class PushPlan:
    """What one transfer streams: the header and chunk plan, where the bytes come from."""

    header: Header
    chunks: list[ChunkSpec]
    source: KVSource
    first_token_id: FirstToken
    fault: ChunkFault | None = None


class GrpcSender(KVSender):
    """KVSender over gRPC; one cached channel per receiver address.

    With `via_shm` (transport "shm", same node only) each transfer's bytes go through a
    shared-memory region of the sender's pool (`shm_staging`) and the gRPC stream carries only
    the control messages. Otherwise `side_channel` ("tcp" or "none", from the config) says
    where the chunk bytes travel."""

    def __init__(self, config: KVTransferConfig, via_shm: bool = False) -> None:
        self._via_shm = via_shm
        self.transport = "shm" if via_shm else "grpc"
        self.shm_staging = ShmStaging(config.shm_pool_mb) if via_shm else None
        self._config = config
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, KVStub]] = {}
        # (address, layout) handshaken -> the receiver's group store ("" when it has none).
        self._handshaken: dict[tuple[str, KVLayout], str] = {}
        self.side_channel = "tcp" if config.side_channel == "tcp" and not via_shm else "none"
        self._side = SideChannels(config.tls_ca_file) if self.side_channel == "tcp" else None

    @property
    def num_side_channel_transfers(self) -> int:
        """Transfers whose chunk bytes went over a TCP side channel (attempted ones included)."""
        return 0 if self._side is None else self._side.num_opened

    def send(
        self,
        *,
        address: str,
        transfer_id: str,
        layout: KVLayout,
        num_tokens: int,
        source: KVSource,
        first_token_id: FirstToken,
        cancel: threading.Event | None = None,
        timeout_s: float | None = None,
        fault: ChunkFault | None = None,
    ) -> TransferStats:
        start = time.monotonic()
        deadline, cancel, chunks = begin_send(
            self._config, transfer_id, layout, num_tokens, cancel, timeout_s
        )
        stub = self._stub(address)
        try:
            group_store = self._handshake(stub, address, layout, deadline, cancel)
            header = Header(transfer_id, layout, num_tokens, len(chunks))
            plan = PushPlan(header, chunks, source, first_token_id, fault)
            reply = self._transfer(stub, address, group_store, plan, deadline, cancel)
            check_acknowledged(layout, num_tokens, reply.num_bytes)
        except TransferError as err:
            if err.code in (StatusCode.UNAVAILABLE, StatusCode.FAILED_PRECONDITION):
                # The peer may have restarted with another layout: handshake again next time.
                with self._lock:
                    self._handshaken.pop((address, layout), None)
            raise
        return TransferStats(
            transfer_id=transfer_id,
            num_bytes=reply.num_bytes,
            num_chunks=len(chunks),
            elapsed_s=time.monotonic() - start,
            transport=self.transport,
            num_wire_bytes=chunks.num_wire_bytes,
        )

    def _transfer(
        self,
        stub: KVStub,
        address: str,
        group_store: str,
        plan: PushPlan,
        deadline: float,
        cancel: threading.Event,
    ) -> kv_transfer_pb2.PushReply:
        """Streams one transfer after the handshake; the "nccl" sender (dist_sender.py)
        overrides it to move the chunk bytes over a pair group."""
        header = plan.header
        messages = outgoing_messages(
            header, plan.chunks, plan.source, plan.first_token_id, cancel.is_set, plan.fault
        )
        if self.shm_staging is None:
            if self._side is not None:
                return self._push_via_side_channel(stub, address, header.transfer_id, messages,
                                                   deadline, cancel)
            return self._push(stub, messages, deadline, cancel)
        num_bytes = header.layout.kv_bytes(header.num_tokens)
        with self.shm_staging.writer(header.transfer_id, num_bytes) as writer:
            return self._push(stub, via_shm(messages, writer), deadline, cancel)

    def close(self) -> None:
        if self.shm_staging is not None:
            self.shm_staging.close()
        with self._lock:
            channels = [channel for channel, _ in self._channels.values()]
            self._channels.clear()
            self._handshaken.clear()
        for channel in channels:
            channel.close()

    def _stub(self, address: str) -> KVStub:
        with self._lock:
            if address not in self._channels:
                limit = self._config.max_message_bytes
                channel = secure_channel(
                    address,
                    [
                        ("grpc.max_send_message_length", limit),
                        ("grpc.max_receive_message_length", limit),
                    ],
                    self._config.auth_token,
                    self._config.tls_ca_file,
                )
                self._channels[address] = (channel, KVStub(channel))
            return self._channels[address][1]

    def _handshake(
        self,
        stub: KVStub,
        address: str,
        layout: KVLayout,
        deadline: float,
        cancel: threading.Event,
    ) -> str:
        """Returns the receiver's group store address ("" when it takes no group chunks)."""
        with self._lock:
            if (address, layout) in self._handshaken:
                return self._handshaken[(address, layout)]
        request = kv_transfer_pb2.HandshakeRequest(layout=layout.to_proto())
        reply: kv_transfer_pb2.HandshakeReply = self._unary(
            stub.Handshake, request, deadline, cancel, f"handshake with {address}"
        )
        with self._lock:
            self._handshaken[(address, layout)] = reply.group_store
        if self._side is not None:
            self._side.learn(address, reply.side_channel)
        return reply.group_store

    def _unary(
        self, method: Any, request: Any, deadline: float, cancel: threading.Event, doing: str
    ) -> Any:
        """One unary call bounded by `deadline` and stopped by `cancel`; raises TransferError."""
        call = method.future(request, timeout=_remaining(deadline))
        return _await(call, cancel, None, doing)

    def _push_via_side_channel(
        self,
        stub: KVStub,
        address: str,
        transfer_id: str,
        messages: Iterator[Message],
        deadline: float,
        cancel: threading.Event,
    ) -> kv_transfer_pb2.PushReply:
        """A ticket from the receiver, a TCP connection that presents it, then the push with
        the bytes on that connection. Closing it on the way out wakes a send blocked on it."""
        assert self._side is not None, "side channel configured"
        request = kv_transfer_pb2.SideChannelRequest(transfer_id=transfer_id)
        reply: kv_transfer_pb2.SideChannelReply = self._unary(
            stub.OpenSideChannel, request, deadline, cancel, f"side channel ticket from {address}"
        )
        connection = self._side.open(address, transfer_id, reply.ticket, deadline)
        try:
            return self._push(stub, connection.stream(messages), deadline, cancel)
        finally:
            connection.close()

    def _push(
        self,
        stub: KVStub,
        messages: Iterator[Message | bytes],
        deadline: float,
        cancel: threading.Event,
    ) -> kv_transfer_pb2.PushReply:
        feeder = _Feeder(messages, cancel, hold_s=_remaining(deadline))
        try:
            call = stub.PushEncoded.future(iter(feeder), timeout=_remaining(deadline))
            reply: kv_transfer_pb2.PushReply = _await(call, cancel, feeder, "push")
            return reply
        finally:
            feeder.release()


def _remaining(deadline: float) -> float:
    # gRPC treats a non-positive timeout as already expired, which is what we want.
    return max(deadline - time.monotonic(), 0.0)


def _await(call: Any, cancel: threading.Event, feeder: _Feeder | None, doing: str) -> Any:
    """Waits for a call's reply; cancels the call when `cancel` is set or the feeder stopped.
    Raises TransferError (the feeder's own error first: it explains the receiver's)."""
    while True:
        try:
            return call.result(timeout=_POLL_S)
        except grpc.FutureTimeoutError:
            if cancel.is_set() or (feeder is not None and feeder.stopped.is_set()):
                call.cancel()
                raise _stop_error(cancel, feeder, doing) from None
        except grpc.FutureCancelledError:
            raise _stop_error(cancel, feeder, doing) from None
        except grpc.RpcError as err:
            if cancel.is_set() or (feeder is not None and feeder.error is not None):
                raise _stop_error(cancel, feeder, doing) from err
            raise error_from_rpc(err, doing) from err


def _stop_error(cancel: threading.Event, feeder: _Feeder | None, doing: str) -> TransferError:
    if feeder is not None and feeder.error is not None:
        return feeder.error
    return TransferCancelled(f"{doing}: cancelled by the sender")
