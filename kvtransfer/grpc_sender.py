"""The prefill replica's KV client: Handshake once per (address, layout), then one
client-streaming Push per transfer, fed lazily from the KVSource.

gRPC consumes the request iterator on its own thread; the calling thread waits for the reply
while watching the cancel event, and cancels the call itself so the receiver sees a
cancellation rather than a truncated stream.
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
from kvtransfer.shm_segment import ShmSegmentWriter
from kvtransfer.stream import (
    Header,
    Message,
    begin_send,
    check_acknowledged,
    outgoing_messages,
    via_shm,
)
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

    def __init__(self, messages: Iterator[Message], cancel: threading.Event, hold_s: float):
        self._messages = messages
        self._cancel = cancel
        self._hold_s = hold_s
        self._released = threading.Event()
        self.stopped = threading.Event()
        self.error: TransferError | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            for message in self._messages:
                yield encode_message(message)
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
    shared-memory segment and the gRPC stream carries only the control messages."""

    def __init__(self, config: KVTransferConfig, via_shm: bool = False) -> None:
        self._via_shm = via_shm
        self.transport = "shm" if via_shm else "grpc"
        self._config = config
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, KVStub]] = {}
        # (address, layout) handshaken -> the receiver's group store ("" when it has none).
        self._handshaken: dict[tuple[str, KVLayout], str] = {}

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
        if not self._via_shm:
            return self._push(stub, messages, deadline, cancel)
        segment = ShmSegmentWriter(header.transfer_id, header.layout.kv_bytes(header.num_tokens))
        try:
            return self._push(stub, via_shm(messages, segment), deadline, cancel)
        finally:
            segment.close()

    def close(self) -> None:
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
        return reply.group_store

    def _unary(
        self, method: Any, request: Any, deadline: float, cancel: threading.Event, doing: str
    ) -> Any:
        """One unary call bounded by `deadline` and stopped by `cancel`; raises TransferError."""
        call = method.future(request, timeout=_remaining(deadline))
        return _await(call, cancel, None, doing)

    def _push(
        self,
        stub: KVStub,
        messages: Iterator[Message],
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
