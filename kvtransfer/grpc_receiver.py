"""The decode replica's KV server: the KVTransfer gRPC service over a TransferTable.

One sync `grpc.server` with a small thread pool; each Push occupies one pool thread for its
duration and runs a ReceiveSession, which writes chunks into the sink from that thread and
calls `on_done` from it. `receiver.cancel` cancels the call from the caller's thread.
A receiver made for "nccl" (dist_receiver.py) adds a GroupHost: JoinGroup, and a group channel
per push for the chunks that arrive over a pair group.
With `kv_transfer.side_channel: tcp` the receiver also listens for TCP side channel connections
(SideChannelHost, tcp_receiver_side.py): `OpenSideChannel` mints a one-time ticket, and a push
whose header sets `side_channel` reads its chunks as frames off the connection that presented
it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Protocol

import grpc

from kvtransfer.errors import (
    TransferCancelled,
    TransferDataLoss,
    TransferDeadlineExceeded,
    TransferError,
    TransferFailedPrecondition,
)
from kvtransfer.grpc_codec import grpc_status, layout_from_proto, message_from_proto
from kvtransfer.layout import KVLayout
from kvtransfer.peer_auth import bind, server_interceptors
from kvtransfer.receive_session import GroupChannel, ReceiveSession
from kvtransfer.shm_mappings import ShmMappingCache
from kvtransfer.stream import Chunk, Commit, Header
from kvtransfer.tcp_receiver_side import PushSideChannel, SideChannelBroken, SideChannelHost
from kvtransfer.transfer_table import TableReceiver, TransferTable
from pdserve.config import KVTransferConfig
from pdserve.internal.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

# Pushes served at once; more wait in gRPC's queue. A decode replica rarely receives more
# transfers concurrently than it has prefill peers.
_NUM_SERVER_THREADS = 8
# How long a stream that ended without its commit waits to learn that its call was cancelled.
_CANCEL_NOTICE_S = 0.1


class GroupHost(Protocol):
    """The receiver's side of pair groups (transport "nccl"); called from gRPC threads."""

    @property
    def store_address(self) -> str:
        """"host:port" of the store where pair groups meet (told to senders at handshake)."""
        ...

    def join(self, request: kv_transfer_pb2.JoinGroupRequest) -> str:
        """Starts joining the sender's new group; returns the receiver's backend without
        waiting for the rendezvous. Raises TransferError."""
        ...

    def channel(self, context: grpc.ServicerContext) -> GroupChannel:
        """A channel for one push, bounded by the call's deadline."""
        ...


class _KVTransferServicer(kv_transfer_pb2_grpc.KVTransferServicer):
    """Thin adapter: protobuf in, session calls, status out."""

    def __init__(
        self, table: TransferTable, layout: KVLayout, allow_shm: bool, groups: GroupHost | None,
        shm_mappings: ShmMappingCache | None = None,
        side: SideChannelHost | None = None,
    ) -> None:
        self._side = side
        self._table = table
        self._layout = layout
        self._allow_shm = allow_shm
        self._groups = groups
        self._shm_mappings = shm_mappings

    def Handshake(
        self, request: kv_transfer_pb2.HandshakeRequest, context: grpc.ServicerContext
    ) -> kv_transfer_pb2.HandshakeReply:
        try:
            mismatch = layout_from_proto(request.layout).mismatch(self._layout)
            if mismatch is not None:
                raise TransferFailedPrecondition(f"layout mismatch: {mismatch}")
        except TransferError as err:
            context.abort(grpc_status(err.code), err.message)
        store = "" if self._groups is None else self._groups.store_address
        side = "" if self._side is None else self._side.address
        return kv_transfer_pb2.HandshakeReply(
            layout=self._layout.to_proto(), group_store=store, side_channel=side
        )

    def OpenSideChannel(
        self, request: kv_transfer_pb2.SideChannelRequest, context: grpc.ServicerContext
    ) -> kv_transfer_pb2.SideChannelReply:
        side = self._side
        try:
            if side is None:
                raise TransferFailedPrecondition(
                    "this receiver has no tcp side channel (kv_transfer.side_channel: none)"
                )
            ticket = side.mint(request.transfer_id)
            ttl_ms = min(int(side.tickets.ttl_s * 1000), 2**32 - 1)
        except TransferError as err:
            context.abort(grpc_status(err.code), err.message)
        return kv_transfer_pb2.SideChannelReply(ticket=ticket, ttl_ms=ttl_ms)

    def JoinGroup(
        self, request: kv_transfer_pb2.JoinGroupRequest, context: grpc.ServicerContext
    ) -> kv_transfer_pb2.JoinGroupReply:
        try:
            if self._groups is None:
                raise TransferFailedPrecondition("this receiver does not accept the nccl transport")
            backend = self._groups.join(request)
        except TransferError as err:
            context.abort(grpc_status(err.code), err.message)
        return kv_transfer_pb2.JoinGroupReply(backend=backend)

    def Push(
        self,
        request_iterator: Iterator[kv_transfer_pb2.KVMessage],
        context: grpc.ServicerContext,
    ) -> kv_transfer_pb2.PushReply:
        channel = None if self._groups is None else self._groups.channel(context)
        session = ReceiveSession(
            self._table,
            self._layout,
            abort_stream=context.cancel,
            allow_shm=self._allow_shm,
            group_channel=channel,
            shm_mappings=self._shm_mappings,
        )
        side = None if self._side is None else self._side.push_channel()
        try:
            num_bytes = _receive(session, request_iterator, context, side)
            return kv_transfer_pb2.PushReply(num_bytes=num_bytes)
        except TransferError as err:
            # No-op when the session already reported it; covers decode and transport errors.
            session.abort(err)
            context.abort(grpc_status(err.code), err.message)
            raise  # context.abort raises; this only tells readers and type checkers
        finally:
            session.close()
            if side is not None:
                side.close()


def _receive(
    session: ReceiveSession,
    request_iterator: Iterator[kv_transfer_pb2.KVMessage],
    context: grpc.ServicerContext,
    side: PushSideChannel | None,
) -> int:
    terminated = threading.Event()

    def on_terminated() -> None:
        terminated.set()
        if side is not None:
            # The call is over (cancel, deadline, stop): wake a read blocked on the side channel.
            side.abort()

    if not context.add_callback(on_terminated):
        on_terminated()
    try:
        for proto in request_iterator:
            _handle(session, proto, side)
    except grpc.RpcError as exc:
        raise _broken_stream_error(context) from exc
    except SideChannelBroken:
        # A cancelled or expired call shows first as its side channel closing under a read.
        if terminated.wait(_CANCEL_NOTICE_S):
            raise _broken_stream_error(context) from None
        raise
    # gRPC ends the iteration quietly when the call died underneath it, at times just before
    # it marks the call cancelled: a stream without its commit waits a moment to tell a
    # cancelled push (CANCELLED) from a truncated one (DATA_LOSS).
    if not session.committed:
        terminated.wait(_CANCEL_NOTICE_S)
    if not context.is_active():
        raise _broken_stream_error(context)
    return session.end()


def _handle(
    session: ReceiveSession, proto: kv_transfer_pb2.KVMessage, side: PushSideChannel | None
) -> None:
    """One message into the session. After a header announcing the side channel (accepted by
    the session first), its connection is claimed and its `num_chunks` frames go to the
    session before the next gRPC message: the push carries no chunk messages, and its commit
    lists the frames' CRC32C."""
    message = message_from_proto(proto)
    announced = isinstance(message, Header) and proto.header.side_channel
    if announced and side is None:
        raise TransferFailedPrecondition("this receiver has no tcp side channel")
    if side is not None and side.claimed:
        if isinstance(message, Chunk):
            raise TransferDataLoss("a chunk message in a push whose chunks are on the side "
                                   "channel")
        if isinstance(message, Commit):
            side.check_commit(list(proto.commit.chunk_crc32c))
    session.handle(message)
    if announced and side is not None and isinstance(message, Header):
        side.claim(message)
        for _ in range(message.num_chunks):
            session.handle(side.next_chunk())


def _broken_stream_error(context: grpc.ServicerContext) -> TransferError:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return TransferDeadlineExceeded("the push passed its deadline")
    return TransferCancelled("the push was cancelled (sender cancelled, disconnected, or the "
                             "receiver cancelled the transfer)")


class GrpcReceiver(TableReceiver):
    """KVReceiver serving KVTransfer on `config.host`, on a port picked by the OS.

    With `allow_shm` it also takes chunks whose bytes lie in a same-node shared-memory segment
    (the "shm" transport uses this receiver's control stream)."""

    transport = "grpc"

    def __init__(self, layout: KVLayout, config: KVTransferConfig, allow_shm: bool = False) -> None:
        self._layout = layout
        self._config = config
        self._allow_shm = allow_shm
        # Senders' pool segments, mapped once for all pushes (kvtransfer/shm_mappings.py).
        self._shm_mappings = ShmMappingCache() if allow_shm else None
        super().__init__()
        self._server: grpc.Server | None = None
        self._address = ""
        self._side: SideChannelHost | None = None

    @property
    def side_channel_address(self) -> str:
        """"host:port" of the TCP side channel listener; "" when it has none."""
        return "" if self._side is None else self._side.address

    @property
    def address(self) -> str:
        return self._address

    def start(self) -> None:
        """Raises RuntimeError when already started or the host cannot be bound, ValueError
        when config.host is "auto" (the caller resolves it: kvtransfer never imports Ray)."""
        if self._server is not None:
            raise RuntimeError("the KV receiver is already started")
        host = self._config.host
        if host == "auto":
            raise ValueError("host: resolve 'auto' to an IP address before starting")
        if self._config.side_channel == "tcp":
            self._side = SideChannelHost(self._config, self._layout)
            self._side.start()
        try:
            self._serve(host)
        except BaseException:
            if self._side is not None:
                self._side.stop()
            raise

    def _serve(self, host: str) -> None:
        limit = self._config.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(_NUM_SERVER_THREADS, thread_name_prefix="kv-receiver"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
            interceptors=server_interceptors(self._config.auth_token),
        )
        kv_transfer_pb2_grpc.add_KVTransferServicer_to_server(
            _KVTransferServicer(self._table, self._layout, self._allow_shm, self._group_host(),
                                self._shm_mappings, side=self._side),
            server,
        )
        bracketed = f"[{host}]" if ":" in host else host
        port = bind(
            server, f"{bracketed}:0", self._config.tls_cert_file, self._config.tls_key_file
        )
        if port == 0:
            raise RuntimeError(f"cannot bind the KV receiver to {host}")
        server.start()
        self._server = server
        self._address = f"{bracketed}:{port}"

    def _group_host(self) -> GroupHost | None:
        """Pair-group support; only the "nccl" receiver (dist_receiver.py) has it."""
        return None

    def stop(self) -> None:
        # Fail the table first so in-flight transfers end as UNAVAILABLE, not as cancelled.
        self._table.close()
        if self._server is not None:
            self._server.stop(grace=None).wait()
        if self._side is not None:
            self._side.stop()
        if self._shm_mappings is not None:
            self._shm_mappings.close()

