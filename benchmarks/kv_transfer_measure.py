"""Timing one payload through each path: a KV transport (across the process boundary, or in
process for inproc), raw loopback TCP, a plain gRPC bytes stream, and an in-memory copy.

Every path runs one untimed warm-up then `repeats` timed transfers of the same bytes into the
same preallocated buffers; times are wall seconds from the first byte handed over until the
receiver's acknowledgement. Driven by the benchmark's main thread; nothing here is
thread-safe.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from benchmarks.kv_transfer_buffers import (
    LAYOUT,
    ScatterSink,
    StreamSource,
    payload_crc32c,
)
from benchmarks.kv_transfer_control import PeerError, PeerProcess
from benchmarks.kv_transfer_peer import (
    ACK,
    BYTES_METHOD,
    MAX_GRPC_MESSAGE_BYTES,
    SEGMENT_BYTES,
    process_usage,
)
from kvtransfer import KVSender, TransferResult, make_receiver
from pdserve.config import KVTransferConfig

# Bound on one transfer; far above the slowest expected (a 4,096-token KV at 0.1 GB/s).
TRANSFER_TIMEOUT_S = 120.0


# Usage snapshots of the processes taking part, by role ("sender", "receiver", "in_process").
Meter = Callable[[], dict[str, dict[str, Any]]]


def in_process_meter() -> dict[str, dict[str, Any]]:
    return {"in_process": process_usage()}


def peer_meter(peer: PeerProcess) -> Meter:
    def meter() -> dict[str, dict[str, Any]]:
        return {"sender": process_usage(), "receiver": peer.request("rusage")}

    return meter


def repeat_timed(
    prepare: Callable[[int], object],
    transfer: Callable[[int], object],
    repeats: int,
    meter: Meter,
) -> dict[str, Any]:
    """Runs prepare(i) untimed then transfer(i) timed, for i = 0 (warm-up) .. repeats.

    Returns the timed transfers' wall times and, per process, CPU seconds and minor page
    faults per timed transfer (including the few control requests of `prepare`)."""
    times_s: list[float] = []
    before: dict[str, dict[str, Any]] = {}
    for attempt in range(repeats + 1):
        if attempt == 1:
            before = meter()
        prepare(attempt)
        start = time.perf_counter()
        transfer(attempt)
        elapsed = time.perf_counter() - start
        if attempt > 0:
            times_s.append(elapsed)
    after = meter()
    usage = {
        role: {
            "cpu_s_per_transfer": (after[role]["cpu_s"] - before[role]["cpu_s"]) / repeats,
            "minor_faults_per_transfer":
                (after[role]["minor_faults"] - before[role]["minor_faults"]) / repeats,
        }
        for role in after
    }
    return {"times_s": times_s, "usage": usage}


def summarize(measured: dict[str, Any], num_bytes: int) -> dict[str, Any]:
    median_s = statistics.median(measured["times_s"])
    return {**measured, "median_s": median_s, "gb_per_s": num_bytes / median_s / 1e9}


class RemoteRig:
    """A receiver of `transport` in the peer process; sinks live there too."""

    def __init__(self, peer: PeerProcess, transport: str, chunk_bytes: int) -> None:
        self._peer = peer
        self._transport = transport
        self._chunk_bytes = chunk_bytes
        reply = peer.request("receiver_start", transport=transport, chunk_bytes=chunk_bytes)
        self.address = str(reply["address"])
        self.meter = peer_meter(peer)

    def expect(self, transfer_id: str, num_tokens: int) -> None:
        self._peer.request(
            "expect", transport=self._transport, transfer_id=transfer_id, num_tokens=num_tokens
        )

    def received_crc32c(self, transfer_id: str, num_tokens: int) -> int:
        """Raises PeerError unless `transfer_id` completed successfully on the receiver."""
        result = self._peer.request("result", transfer_id=transfer_id)
        if not result.get("done") or not result.get("ok"):
            raise PeerError(f"transfer {transfer_id} did not complete: {result}")
        reply = self._peer.request("verify", num_tokens=num_tokens, chunk_bytes=self._chunk_bytes)
        return int(reply["crc32c"])

    def close(self) -> None:
        self._peer.request("receiver_stop", transport=self._transport)


class LocalRig:
    """A receiver of `transport` in this process (inproc), with its sinks."""

    def __init__(self, transport: str, chunk_bytes: int) -> None:
        self._chunk_bytes = chunk_bytes
        self._receiver = make_receiver(transport, LAYOUT, KVTransferConfig(chunk_bytes=chunk_bytes))
        self._receiver.start()
        self.address = self._receiver.address
        self.meter: Meter = in_process_meter
        self._sinks: dict[int, ScatterSink] = {}
        self._results: dict[str, TransferResult] = {}
        self._lock = threading.Lock()

    def expect(self, transfer_id: str, num_tokens: int) -> None:
        sink = self._sinks.get(num_tokens)
        if sink is None:
            sink = self._sinks[num_tokens] = ScatterSink(num_tokens)
        self._receiver.expect(transfer_id, num_tokens, sink, self._on_done)

    def _on_done(self, result: TransferResult) -> None:
        with self._lock:
            self._results[result.transfer_id] = result

    def received_crc32c(self, transfer_id: str, num_tokens: int) -> int:
        with self._lock:
            result = self._results.pop(transfer_id, None)
        if result is None or not result.ok:
            raise PeerError(f"transfer {transfer_id} did not complete: {result}")
        return self._sinks[num_tokens].stream_crc32c(self._chunk_bytes)

    def close(self) -> None:
        self._receiver.stop()


Rig = RemoteRig | LocalRig


def measure_transport(
    rig: Rig, sender: KVSender, num_tokens: int, payload: np.ndarray, repeats: int
) -> dict[str, Any]:
    """Times `sender.send` to `rig`; then checks every byte of the last transfer arrived.
    Raises PeerError when the received bytes differ from the payload."""
    source = StreamSource(num_tokens, payload)
    transfer_ids = [f"{sender.transport}-{num_tokens}-{i}" for i in range(repeats + 1)]

    def send(attempt: int) -> None:
        sender.send(
            address=rig.address, transfer_id=transfer_ids[attempt], layout=LAYOUT,
            num_tokens=num_tokens, source=source, first_token_id=1,
            timeout_s=TRANSFER_TIMEOUT_S,
        )

    def expect(attempt: int) -> None:
        rig.expect(transfer_ids[attempt], num_tokens)

    measured = repeat_timed(expect, send, repeats, rig.meter)
    if rig.received_crc32c(transfer_ids[-1], num_tokens) != payload_crc32c(payload):
        raise PeerError(f"{sender.transport}: the received KV differs from the sent KV")
    return measured


class TcpBaseline:
    """Raw loopback TCP to the peer: sendall in SEGMENT_BYTES writes, recv_into one buffer,
    then a one-byte acknowledgement."""

    def __init__(self, peer: PeerProcess) -> None:
        self._peer = peer
        port = int(peer.request("tcp_listen")["port"])
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30.0)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(TRANSFER_TIMEOUT_S)
        peer.request("tcp_accept")

    def measure(self, payload: np.ndarray, repeats: int) -> dict[str, Any]:
        view = payload.data.cast("B")

        def prepare(_: int) -> None:
            self._peer.request("tcp_recv", num_bytes=view.nbytes)

        def send(_: int) -> None:
            for start in range(0, view.nbytes, SEGMENT_BYTES):
                self._sock.sendall(view[start : start + SEGMENT_BYTES])
            if self._sock.recv(1) != ACK:
                raise PeerError("raw TCP: the receiver closed before acknowledging")

        return repeat_timed(prepare, send, repeats, peer_meter(self._peer))

    def close(self) -> None:
        self._sock.close()


class GrpcBytesBaseline:
    """A plain gRPC client-streaming call of raw `bytes` messages (no protobuf, no checksum):
    what gRPC's Python API itself allows, to separate its cost from kvtransfer's."""

    def __init__(self, peer: PeerProcess) -> None:
        self._peer = peer
        port = int(peer.request("grpc_bytes_start")["port"])
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES)]
        )
        self._push = self._channel.stream_unary(BYTES_METHOD)

    def measure(self, payload: np.ndarray, repeats: int) -> dict[str, Any]:
        view = payload.data.cast("B")
        # Built before timing: the messages are ready-made bytes, as in the ideal caller.
        segments = [
            bytes(view[start : start + SEGMENT_BYTES])
            for start in range(0, view.nbytes, SEGMENT_BYTES)
        ]

        def prepare(_: int) -> None:
            self._peer.request("grpc_bytes_expect", num_bytes=view.nbytes)

        def send(_: int) -> None:
            reply = self._push(iter(segments), timeout=TRANSFER_TIMEOUT_S)
            if int.from_bytes(reply, "little") != view.nbytes:
                raise PeerError("plain gRPC: the receiver acknowledged another byte count")

        return repeat_timed(prepare, send, repeats, peer_meter(self._peer))

    def close(self) -> None:
        self._channel.close()


def measure_memcpy(payload: np.ndarray, repeats: int) -> dict[str, Any]:
    """One numpy copy of the payload into a preallocated, already-touched buffer."""
    target = np.full(payload.nbytes, 0, dtype=np.uint8)

    def copy(_: int) -> None:
        np.copyto(target, payload)

    return repeat_timed(lambda _: None, copy, repeats, in_process_meter)
