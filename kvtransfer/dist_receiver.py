"""The decode replica's "nccl" receiver: GrpcReceiver plus the receiving side of pair groups.

At `start` it serves a torch.distributed TCPStore on `config.host` (port picked by the OS,
listening on that address only) and tells senders where it is at handshake. `JoinGroup`
starts joining the sender's new group as rank 1 on the group's waiter thread and replies at
once; a sender's new group replaces its old one. A push whose header names a group takes the
group's lock at its first `via_group` chunk (held until the push ends), receives each chunk
into a buffer sized from the layout, and tears the group down if the push fails.
"""

from __future__ import annotations

import datetime
import re
import socket
import threading
import time

import grpc
import torch.distributed as dist

from kvtransfer.dist_group import (
    RECEIVER_RANK,
    GroupSpec,
    PairGroup,
    acquire_pair_lock,
    backend_for,
)
from kvtransfer.errors import (
    TransferDataLoss,
    TransferFailedPrecondition,
    TransferResourceExhausted,
    TransferUnavailable,
)
from kvtransfer.grpc_receiver import GroupHost, GrpcReceiver
from kvtransfer.layout import ChunkSpec, KVLayout
from pdserve.config import KVTransferConfig
from pdserve.internal.v1 import kv_transfer_pb2

# Groups kept at once (one per prefill replica that sent here); past it, the least recently
# used idle group is evicted so replicas that went away do not hold memory forever.
MAX_GROUPS = 64
_SENDER_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_GENERATION_RE = re.compile(r"^[0-9]{1,18}$")
# Pending connections the store's listening socket queues.
_STORE_BACKLOG = 128


class DistReceiver(GrpcReceiver):
    """KVReceiver of the "nccl" transport; also accepts inline (grpc) chunks.

    `transport` is the backend that runs: "gloo" for KV on the CPU, "nccl" for KV on a CUDA
    device. Raises ValueError at construction when `kv_device` is CUDA without CUDA."""

    def __init__(self, layout: KVLayout, config: KVTransferConfig, kv_device: str = "cpu") -> None:
        super().__init__(layout, config)
        self.transport = backend_for(kv_device)
        self._kv_device = kv_device
        self._groups: _ReceiverGroups | None = None

    @property
    def num_groups_built(self) -> int:
        """Groups joined since start (a reused group counts once)."""
        return 0 if self._groups is None else self._groups.num_built

    @property
    def num_open_groups(self) -> int:
        """Groups joined and not torn down, one at most per sender."""
        return 0 if self._groups is None else self._groups.num_open

    def _group_host(self) -> GroupHost:
        self._groups = _ReceiverGroups(self._config, self.transport, self._kv_device)
        return self._groups

    def stop(self) -> None:
        super().stop()
        if self._groups is not None:
            self._groups.close()


class _ReceiverGroups:
    """The groups of one receiver, by sender id. Thread-safe (gRPC threads call it)."""

    def __init__(self, config: KVTransferConfig, backend: str, kv_device: str) -> None:
        self._config = config
        self._backend = backend
        self._kv_device = kv_device
        self._host = config.host
        # A group chunk is bounded like an inline one (the sender checks the same limit).
        self.max_chunk_bytes = config.max_message_bytes
        self._store: dist.Store | None
        self._store, self.store_address = _serve_store(config.host, config.timeout_s)
        self._lock = threading.Lock()
        self._by_sender: dict[str, PairGroup] = {}
        self._num_built = 0
        self._closed = False

    @property
    def num_built(self) -> int:
        with self._lock:
            return self._num_built

    @property
    def num_open(self) -> int:
        with self._lock:
            groups = list(self._by_sender.values())
        return sum(not group.broken for group in groups)

    def join(self, request: kv_transfer_pb2.JoinGroupRequest) -> str:
        sender_id, _, generation = request.group_id.partition("/")
        if not (_SENDER_ID_RE.match(request.sender_id) and sender_id == request.sender_id
                and _GENERATION_RE.match(generation)):
            raise TransferFailedPrecondition(f"malformed group id {request.group_id[:80]!r}")
        if request.backend != self._backend:
            raise TransferFailedPrecondition(
                f"backend mismatch: sender {request.backend[:16]}, receiver {self._backend}"
            )
        group = PairGroup(GroupSpec(request.group_id, RECEIVER_RANK, self._backend,
                                    self._kv_device, host=self._host))
        with self._lock:
            store = self._store
            if self._closed or store is None:
                raise TransferUnavailable("the receiver is stopped")
            # The sender's new group replaces its old one; a new sender may evict another's.
            dropped = self._by_sender.get(sender_id)
            if dropped is None and len(self._by_sender) >= MAX_GROUPS:
                dropped = self._evict_locked()
            self._by_sender[sender_id] = group
            self._num_built += 1
        if dropped is not None:
            dropped.tear_down()
        group.start_build(lambda: store, self._config.timeout_s)
        return self._backend

    def channel(self, context: grpc.ServicerContext) -> _PushChannel:
        remaining = context.time_remaining()
        timeout_s = self._config.timeout_s if remaining is None else \
            min(remaining, self._config.timeout_s)
        return _PushChannel(self, context, time.monotonic() + timeout_s)

    def lookup(self, group_id: str) -> PairGroup:
        """Raises UNAVAILABLE when the group is not (or no longer) open here."""
        with self._lock:
            group = self._by_sender.get(group_id.partition("/")[0])
        if group is None or group.group_id != group_id or group.broken:
            raise TransferUnavailable(f"pair group {group_id[:80]} is not open on this receiver")
        return group

    def discard(self, group: PairGroup) -> None:
        with self._lock:
            sender_id = group.group_id.partition("/")[0]
            if self._by_sender.get(sender_id) is group:
                del self._by_sender[sender_id]
        group.tear_down()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            groups = list(self._by_sender.values())
            self._by_sender.clear()
        for group in groups:
            group.tear_down()
        # Dropping the master store closes its listening socket.
        self._store = None

    def _evict_locked(self) -> PairGroup:
        idle = [(group.last_used, sender) for sender, group in self._by_sender.items()
                if not group.lock.locked()]
        if not idle:
            raise TransferResourceExhausted(f"{MAX_GROUPS} pair groups are busy")
        return self._by_sender.pop(min(idle)[1])


class _PushChannel:
    """The GroupChannel of one push (see receive_session.GroupChannel)."""

    def __init__(self, groups: _ReceiverGroups, context: grpc.ServicerContext,
                 deadline: float) -> None:
        self._groups = groups
        self._context = context
        self._deadline = deadline
        self._group: PairGroup | None = None

    def receive(self, group_id: str, spec: ChunkSpec, num_bytes: int) -> memoryview:
        if num_bytes > self._groups.max_chunk_bytes:
            raise TransferDataLoss(f"chunk {spec.seq}: {num_bytes} bytes is more than a chunk "
                                   f"may carry ({self._groups.max_chunk_bytes})")
        group = self._open(group_id)
        return group.receive(num_bytes, self._deadline, self._stopped,
                             f"receiving chunk {spec.seq} over pair group {group_id}")

    def close(self, failed: bool) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        group.last_used = time.monotonic()
        group.lock.release()
        if failed:
            self._groups.discard(group)

    def _stopped(self) -> bool:
        # False once the call was cancelled (receiver.cancel, sender gone) or timed out.
        return not self._context.is_active()

    def _open(self, group_id: str) -> PairGroup:
        if self._group is not None:
            return self._group
        group = self._groups.lookup(group_id)
        acquire_pair_lock(group.lock, self._deadline, self._stopped, f"pair group {group_id}")
        self._group = group
        group.wait_built(self._deadline, self._stopped)
        return group


def _serve_store(host: str, timeout_s: float) -> tuple[dist.Store, str]:
    """A master TCPStore listening on `host` only (TCPStore alone would listen on every
    interface), on a port picked by the OS; returns it and its "host:port"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(_STORE_BACKLOG)
        port = int(listener.getsockname()[1])
    except OSError as exc:
        listener.close()
        raise RuntimeError(f"cannot bind the group store to {host}: {exc}") from exc
    # The store owns the socket from here on and closes it when dropped.
    store = dist.TCPStore(host, port, None, True, datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=listener.detach())
    bracketed = f"[{host}]" if ":" in host else host
    return store, f"{bracketed}:{port}"
