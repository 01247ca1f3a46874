"""The prefill replica's "nccl" sender: GrpcSender's control stream (handshake, header, chunk
descriptors, commit) with each chunk's bytes sent over the pair group of (this sender, the
receiving decode replica) instead of inline.

Life of a transfer:
1. handshake (cached) tells the receiver's group store address, or refuses the transport;
2. take the pair's lock (held for the whole transfer: one transfer per pair at a time, so
   the bytes of two transfers never mix on the group's single ordered channel);
3. no group yet (or the last one was torn down): JoinGroup RPC, then join as rank 0;
4. push: for each chunk, post its send, then announce it (`KVChunk.via_group`); the next
   source read overlaps the send, which completes before the next chunk is posted;
5. any failure tears the pair's group down, on this side (here) and on the receiver's.
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch.distributed as dist

from kvtransfer.dist_group import (
    SENDER_RANK,
    GroupSpec,
    PairGroup,
    acquire_pair_lock,
    backend_for,
    local_host_towards,
    split_host_port,
)
from kvtransfer.errors import TransferError, TransferFailedPrecondition
from kvtransfer.grpc_sender import GrpcSender, KVStub, PushPlan
from kvtransfer.stream import Chunk, Message, outgoing_messages
from pdserve.config import KVTransferConfig
from pdserve.internal.v1 import kv_transfer_pb2


@dataclasses.dataclass
class _Pair:
    """This sender's side of one pair: its lock and current group."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    group: PairGroup | None = None


class DistSender(GrpcSender):
    """KVSender of the "nccl" transport; `transport` is the backend that runs ("gloo" for KV
    on the CPU, "nccl" for KV on a CUDA device), and so is every TransferStats.transport.

    Raises ValueError at construction when `kv_device` is CUDA without CUDA (no fallback)."""

    def __init__(self, config: KVTransferConfig, kv_device: str = "cpu") -> None:
        super().__init__(config)
        self._backend = backend_for(kv_device)
        self._kv_device = kv_device
        self.transport = self._backend
        # Names this sender's groups on every receiver.
        self._sender_id = secrets.token_hex(8)
        self._pairs_lock = threading.Lock()
        self._pairs: dict[str, _Pair] = {}
        self._num_groups_built = 0

    @property
    def num_groups_built(self) -> int:
        """Groups built since construction (a reused group counts once)."""
        with self._pairs_lock:
            return self._num_groups_built

    @property
    def num_open_groups(self) -> int:
        """Groups built and not torn down (0 after every pair's last transfer failed)."""
        with self._pairs_lock:
            groups = [pair.group for pair in self._pairs.values()]
        return sum(group is not None and not group.broken for group in groups)

    def close(self) -> None:
        with self._pairs_lock:
            pairs = list(self._pairs.values())
            self._pairs.clear()
        for pair in pairs:
            if pair.group is not None:
                pair.group.tear_down()
        super().close()

    def _transfer(
        self,
        stub: KVStub,
        address: str,
        group_store: str,
        plan: PushPlan,
        deadline: float,
        cancel: threading.Event,
    ) -> kv_transfer_pb2.PushReply:
        if not group_store:
            raise TransferFailedPrecondition(
                f"the receiver at {address} does not accept the nccl transport"
            )
        with self._pairs_lock:
            pair = self._pairs.setdefault(address, _Pair())
        acquire_pair_lock(pair.lock, deadline, cancel.is_set, f"sending to {address}")
        try:
            if pair.group is None or pair.group.broken:
                pair.group = None
                pair.group = self._build(stub, address, group_store, deadline, cancel)
            group = pair.group
            try:
                return self._push_over(stub, group, plan, deadline, cancel)
            except TransferError:
                # A send may be left unmatched: the group's byte order is lost.
                group.tear_down()
                pair.group = None
                raise
        finally:
            if pair.group is not None:
                pair.group.last_used = time.monotonic()
            pair.lock.release()

    def _build(
        self,
        stub: KVStub,
        address: str,
        group_store: str,
        deadline: float,
        cancel: threading.Event,
    ) -> PairGroup:
        with self._pairs_lock:
            self._num_groups_built += 1
            group_id = f"{self._sender_id}/{self._num_groups_built}"
        request = kv_transfer_pb2.JoinGroupRequest(
            sender_id=self._sender_id, group_id=group_id, backend=self._backend
        )
        reply: kv_transfer_pb2.JoinGroupReply = self._unary(
            stub.JoinGroup, request, deadline, cancel, f"joining a pair group with {address}"
        )
        if reply.backend != self._backend:
            raise TransferFailedPrecondition(
                f"backend mismatch: sender {self._backend}, receiver {reply.backend}"
            )
        host, port = split_host_port(group_store)
        group = PairGroup(GroupSpec(group_id, SENDER_RANK, self._backend, self._kv_device,
                                    host=local_host_towards(host, port)))
        timeout_s = max(deadline - time.monotonic(), 0.001)
        group.start_build(lambda: _store_client(host, port, timeout_s), timeout_s)
        group.wait_built(deadline, cancel.is_set)
        return group

    def _push_over(
        self,
        stub: KVStub,
        group: PairGroup,
        plan: PushPlan,
        deadline: float,
        cancel: threading.Event,
    ) -> kv_transfer_pb2.PushReply:
        header = dataclasses.replace(plan.header, group_id=group.group_id)
        finished = threading.Event()

        def should_stop() -> bool:
            # A failed call leaves no one to receive a posted send: stop waiting for it.
            return cancel.is_set() or finished.is_set()

        messages = outgoing_messages(
            header, plan.chunks, plan.source, plan.first_token_id, cancel.is_set, plan.fault
        )
        try:
            return self._push(
                stub, _via_group(messages, group, deadline, should_stop), deadline, cancel
            )
        finally:
            finished.set()


def _via_group(
    messages: Iterator[Message],
    group: PairGroup,
    deadline: float,
    should_stop: Callable[[], bool],
) -> Iterator[Message]:
    """Sends each chunk's bytes over the group and announces it on the control stream. A send
    completes before the next is posted (the staging buffer is reused) but after the next
    chunk was read, so reading overlaps sending."""
    sent: Future[None] | None = None
    for message in messages:
        if sent is not None:
            group.wait(sent, deadline, should_stop, "sending a chunk over the pair group")
            sent = None
        if isinstance(message, Chunk):
            sent = group.post_send(message.data, deadline)
            message = Chunk(spec=message.spec, crc32c=message.crc32c, data=b"", via_group=True)
        yield message


def _store_client(host: str, port: int, timeout_s: float) -> dist.Store:
    # Many senders come and go: the store does not wait for a fixed number of workers.
    return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)
