"""Pair groups of the "nccl" transport: one 2-rank torch.distributed process group per
(prefill replica, decode replica) pair, built on the first transfer of the pair, reused by the
next ones, and torn down by either side after any failed transfer (the next builds a new one).

Rank 0 is the sender (prefill replica), rank 1 the receiver (decode replica). Groups meet in the
receiver's TCPStore under a PrefixStore named by the group id ("<sender_id>/<generation>"), so
two groups never share keys; the global default group is never created. Backend: NCCL when the
KV lives on a CUDA device, gloo when it lives on the CPU (`backend_for`).

Every wait is bounded. A gloo send/recv wait is woken neither by `abort()` nor by the peer
closing its socket (measured with torch 2.13): it ends only when the data moved or its timeout
passed. So each group has one waiter thread that runs the blocking calls (build, `work.wait`)
with the transfer's remaining time as timeout; the transfer's thread polls that thread's result
every 20 ms together with its stop condition, and tears the group down when it gives up. The
waiter thread of a torn-down group may stay blocked until that timeout (at most timeout_s).

Imports torch: only dist_sender.py and dist_receiver.py import this module.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kvtransfer.errors import (
    TransferCancelled,
    TransferDataLoss,
    TransferDeadlineExceeded,
    TransferError,
    TransferUnavailable,
)

SENDER_RANK = 0
RECEIVER_RANK = 1
# How often a waiting transfer looks at its stop condition: the bound on cancel latency.
_POLL_S = 0.02
# Rank 0 sends this once a group is built; rank 1 checks it (the group works end to end).
_WARM_UP_VALUE = 0x5EED
# A failure message from gloo runs over several lines; the first says what happened.
_MAX_ERROR_CHARS = 300


def backend_for(kv_device: str) -> str:
    """The backend for KV living on `kv_device`: "nccl" for "cuda[:N]", "gloo" for "cpu".

    Raises ValueError for a CUDA device when CUDA is not available, or another device type:
    the transport never falls back silently.
    """
    device = torch.device(kv_device)
    if device.type == "cpu":
        return "gloo"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"kv_device {kv_device!r}: CUDA is not available here")
        return "nccl"
    raise ValueError(f"kv_device {kv_device!r}: the nccl transport takes cpu or cuda devices")


def split_host_port(address: str) -> tuple[str, int]:
    """("::1", 5) for "[::1]:5"; raises TransferUnavailable for a malformed address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferUnavailable(f"malformed group store address {address!r}")
    return host.strip("[]"), int(port)


def local_host_towards(host: str, port: int) -> str:
    """The local address whose interface routes to `host` (what gloo binds to on the sender).
    Connecting a UDP socket sends nothing; it only picks the route."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise TransferUnavailable(f"no route to the group store {host}: {exc}") from None


def acquire_pair_lock(
    lock: threading.Lock, deadline: float, should_stop: Callable[[], bool], doing: str
) -> None:
    """Takes the lock that serializes the transfers of one pair; raises CANCELLED or
    DEADLINE_EXCEEDED instead of waiting past the transfer's end."""
    while not lock.acquire(timeout=max(min(_POLL_S, deadline - time.monotonic()), 0.0)):
        if should_stop():
            raise TransferCancelled(f"{doing}: stopped while waiting for the pair group")
        if time.monotonic() >= deadline:
            raise TransferDeadlineExceeded(f"{doing}: the pair group stayed busy")


@dataclass(frozen=True)
class GroupSpec:
    """One side of one group."""

    group_id: str
    rank: int
    backend: str
    # Where the staging buffers live: "cpu" (gloo) or "cuda[:N]" (nccl).
    device: str
    # The local address gloo listens on for its peer.
    host: str


class PairGroup:
    """One side of a 2-rank group. Thread-safe; `lock` is held by the transfer using it.

    Owns the process group, its waiter thread and the staging buffers (one per kind, grown to
    the largest chunk seen). `tear_down` is idempotent; afterwards every call raises
    UNAVAILABLE.
    """

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self._state_lock = threading.Lock()
        self._torn_down = False
        self._pg: Any = None
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="kv-group")
        self._built: Future[None] | None = None
        self._staging: dict[str, torch.Tensor] = {}

    @property
    def group_id(self) -> str:
        return self.spec.group_id

    @property
    def broken(self) -> bool:
        with self._state_lock:
            return self._torn_down

    def start_build(self, make_store: Callable[[], dist.Store], timeout_s: float) -> None:
        """Starts joining the group on the waiter thread; does not block."""
        self._built = self._submit(self._build, make_store, timeout_s)

    def wait_built(self, deadline: float, should_stop: Callable[[], bool]) -> None:
        """BLOCKS until both ranks joined and exchanged the warm-up message."""
        assert self._built is not None, "start_build comes first"
        self._await(self._built, deadline, should_stop, f"building pair group {self.group_id}")

    def post_send(self, data: bytes | memoryview, deadline: float) -> Future[None]:
        """Starts sending `data` to the receiver; the bytes must stay unchanged until the
        returned future is awaited with `wait`. Raises UNAVAILABLE when the group is broken."""
        view = memoryview(data).cast("B")
        if view.readonly or self.spec.backend == "nccl":
            # gloo and NCCL need a tensor; a read-only buffer (bytes) cannot back one.
            tensor = self._buffer("host", view.nbytes, "cpu")
            tensor.numpy()[:] = np.frombuffer(view, dtype=np.uint8)
        else:
            tensor = torch.frombuffer(view, dtype=torch.uint8)
        if self.spec.backend == "nccl":
            tensor = self._buffer("device", view.nbytes, self.spec.device).copy_(tensor)
        work = self._post(lambda pg: pg.send([tensor], RECEIVER_RANK, 0))
        return self._submit(_wait_work, work, deadline, (tensor, view))

    def wait(self, sent: Future[None], deadline: float, should_stop: Callable[[], bool],
             doing: str) -> None:
        """BLOCKS until a posted send completed. Raises TransferError and tears the group down
        when it did not (stopped, deadline, peer gone)."""
        self._await(sent, deadline, should_stop, doing)

    def receive(self, num_bytes: int, deadline: float, should_stop: Callable[[], bool],
                doing: str) -> memoryview:
        """BLOCKS until the sender's next `num_bytes` bytes arrived; returns a view of them that
        is valid until the next call. Raises TransferError and tears the group down on failure.
        The caller sized `num_bytes` from the layout, never from what the peer said."""
        tensor = self._buffer("recv", num_bytes, self.spec.device)
        work = self._post(lambda pg: pg.recv([tensor], SENDER_RANK, 0))
        self._await(self._submit(_wait_work, work, deadline, tensor), deadline, should_stop,
                    doing)
        if self.spec.backend == "nccl":
            tensor = self._buffer("host", num_bytes, "cpu").copy_(tensor)
        return tensor.numpy().data.cast("B")

    def tear_down(self) -> None:
        """Aborts the process group (its connections close, so the peer's next call fails)
        and stops the waiter thread once its current call ends. Idempotent; never raises."""
        with self._state_lock:
            if self._torn_down:
                return
            self._torn_down = True
            pg, self._pg = self._pg, None
        if pg is not None:
            _abort(pg)
        self._waiter.shutdown(wait=False, cancel_futures=True)
        # A pending recv keeps its own reference to its tensor.
        self._staging.clear()

    def _build(self, make_store: Callable[[], dist.Store], timeout_s: float) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore(self.group_id, make_store())
        pg = _new_process_group(store, self.spec, timeout)
        with self._state_lock:
            torn_down = self._torn_down
            if not torn_down:
                self._pg = pg
        if torn_down:
            _abort(pg)
            raise TransferUnavailable(f"pair group {self.group_id} was torn down while joining")
        token = torch.full((1,), _WARM_UP_VALUE * (self.spec.rank == SENDER_RANK),
                           dtype=torch.int64, device=self.spec.device)
        if self.spec.rank == SENDER_RANK:
            pg.send([token], RECEIVER_RANK, 0).wait(timeout)
        else:
            pg.recv([token], SENDER_RANK, 0).wait(timeout)
            if int(token.item()) != _WARM_UP_VALUE:
                raise TransferDataLoss(f"pair group {self.group_id}: wrong warm-up message")

    def _post(self, post: Callable[[Any], Any]) -> Any:
        with self._state_lock:
            pg = self._pg
        if pg is None:
            raise TransferUnavailable(f"pair group {self.group_id} is not open (torn down)")
        try:
            return post(pg)
        except Exception as exc:
            self.tear_down()
            raise TransferUnavailable(f"pair group {self.group_id}: {_first_line(exc)}") from exc

    def _submit(self, call: Callable[..., None], *args: Any) -> Future[None]:
        try:
            return self._waiter.submit(call, *args)
        except RuntimeError as exc:
            # tear_down shut the waiter down under us.
            raise TransferUnavailable(f"pair group {self.group_id} was torn down") from exc

    def _buffer(self, kind: str, num_bytes: int, device: str) -> torch.Tensor:
        staging = self._staging.get(kind)
        if staging is None or staging.numel() < num_bytes:
            staging = torch.empty(num_bytes, dtype=torch.uint8, device=device)
            self._staging[kind] = staging
        return staging[:num_bytes]

    def _await(self, future: Future[Any], deadline: float, should_stop: Callable[[], bool],
               doing: str) -> Any:
        try:
            return self._poll(future, deadline, should_stop, doing)
        except TransferError:
            self.tear_down()
            raise
        except Exception as exc:
            self.tear_down()
            if time.monotonic() >= deadline:
                raise TransferDeadlineExceeded(f"{doing}: {_first_line(exc)}") from exc
            raise TransferUnavailable(f"{doing}: {_first_line(exc)}") from exc

    def _poll(self, future: Future[Any], deadline: float, should_stop: Callable[[], bool],
              doing: str) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferDeadlineExceeded(f"{doing}: the transfer passed its deadline")
            try:
                return future.result(timeout=min(_POLL_S, remaining))
            except TimeoutError:
                if should_stop():
                    raise TransferCancelled(f"{doing}: stopped") from None
                if self.broken:
                    raise TransferUnavailable(f"{doing}: pair group {self.group_id} was torn"
                                              " down") from None


def _new_process_group(store: dist.Store, spec: GroupSpec, timeout: datetime.timedelta) -> Any:
    if spec.backend == "gloo":
        # The options that take devices and threads; torch's own stubs omit them.
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timeout
        # Point-to-point calls do not use gloo's worker threads; one is the minimum.
        options._threads = 1
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=spec.host)]
        return dist.ProcessGroupGloo(store, spec.rank, 2, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    pg = dist.ProcessGroupNCCL(store, spec.rank, 2, options)
    # NCCL would create its communicator inside the first send or recv, unbounded by a wait
    # timeout; connecting here keeps that inside the bounded build.
    pg.eager_connect_single_device(torch.device(spec.device))
    return pg


def _wait_work(work: Any, deadline: float, keep_alive: object) -> None:
    """Runs on the waiter thread. `keep_alive` (the buffers of the operation) is only held:
    the executor keeps the arguments until this returns."""
    timeout_s = max(deadline - time.monotonic(), 0.001)
    if not work.wait(datetime.timedelta(seconds=timeout_s)):
        raise TransferUnavailable("the torch.distributed operation did not complete")


def _abort(pg: Any) -> None:
    # Best effort: the group is being dropped either way.
    with contextlib.suppress(Exception):
        pg.abort()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:_MAX_ERROR_CHARS]
