"""The benchmark's receiving process: a KV receiver of the transport under test, a raw TCP
receiver and a plain gRPC bytes receiver, all writing into preallocated buffers.

Started by `PeerProcess` (spawn) with `run_peer`; obeys one control request at a time (see
kv_transfer_control.py). Receivers serve on their own threads; the raw TCP receive runs on the
control thread, between the reply that says it is ready and the next request.
"""

from __future__ import annotations

import resource
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np

from benchmarks.kv_transfer_buffers import LAYOUT, ScatterSink, checked_num_bytes
from benchmarks.kv_transfer_control import recv_message, send_message
from kvtransfer import KVReceiver, TransferResult, make_receiver
from pdserve.config import KVTransferConfig

# Plain gRPC baseline: one client-streaming method taking raw bytes (no protobuf).
BYTES_SERVICE = "bench.BytesSink"
BYTES_METHOD = f"/{BYTES_SERVICE}/Push"
# Raw TCP and gRPC-bytes writes/messages: the size of the transports' chunks.
SEGMENT_BYTES = 4 * 1024 * 1024
MAX_GRPC_MESSAGE_BYTES = 32 * 1024 * 1024
ACK = b"\x01"


def process_usage() -> dict[str, Any]:
    """CPU seconds (user + system, all threads) and minor page faults of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "minor_faults": usage.ru_minflt}


def run_peer(conn: Connection) -> None:
    """Entry point of the peer process: serves control requests until "exit"."""
    peer = _Peer()
    try:
        while True:
            message = recv_message(conn)
            op = str(message.get("op", ""))
            handler = peer.handlers.get(op)
            if handler is None:
                send_message(conn, {"error": f"unknown op {op!r}"})
                continue
            try:
                reply, after = handler(message)
            except Exception as exc:  # reported to the parent, which decides
                send_message(conn, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            send_message(conn, reply)
            if after is not None:
                after()
            if op == "exit":
                return
    finally:
        peer.shutdown()


Handler = Callable[[dict[str, Any]], tuple[dict[str, Any], Callable[[], None] | None]]


class _Peer:
    def __init__(self) -> None:
        self._receivers: dict[str, KVReceiver] = {}
        self._sinks: dict[int, ScatterSink] = {}
        self._results: dict[str, TransferResult] = {}
        self._results_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._tcp_buffer = np.empty(0, dtype=np.uint8)
        self._bytes_server: grpc.Server | None = None
        self._bytes_sink = _BytesSink()
        self.handlers: dict[str, Handler] = {
            "receiver_start": self._receiver_start,
            "expect": self._expect,
            "result": self._result,
            "verify": self._verify,
            "receiver_stop": self._receiver_stop,
            "tcp_listen": self._tcp_listen,
            "tcp_accept": self._tcp_accept,
            "tcp_recv": self._tcp_recv,
            "grpc_bytes_start": self._grpc_bytes_start,
            "grpc_bytes_expect": self._grpc_bytes_expect,
            "rusage": lambda _: (process_usage(), None),
            "exit": lambda _: ({}, None),
        }

    def _receiver_start(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        transport = str(message["transport"])
        self._stop_receiver(transport)
        config = KVTransferConfig(chunk_bytes=int(message["chunk_bytes"]))
        receiver = make_receiver(transport, LAYOUT, config)
        receiver.start()
        self._receivers[transport] = receiver
        return {"address": receiver.address}, None

    def _expect(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        receiver = self._receivers[str(message["transport"])]
        num_tokens = int(message["num_tokens"])
        # Transfers run one at a time, so every transport shares the sink of a size.
        sink = self._sinks.get(num_tokens)
        if sink is None:
            sink = self._sinks[num_tokens] = ScatterSink(num_tokens)
        receiver.expect(str(message["transfer_id"]), num_tokens, sink, self._on_done)
        return {}, None

    def _on_done(self, result: TransferResult) -> None:
        with self._results_lock:
            self._results[result.transfer_id] = result

    def _result(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        with self._results_lock:
            result = self._results.pop(str(message["transfer_id"]), None)
        if result is None:
            return {"done": False}, None
        failure = None if result.error is None else result.error.message
        return {"done": True, "ok": result.ok, "num_bytes": result.num_bytes,
                "failure": failure}, None

    def _verify(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        sink = self._sinks[int(message["num_tokens"])]
        return {"crc32c": sink.stream_crc32c(int(message["chunk_bytes"]))}, None

    def _receiver_stop(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        self._stop_receiver(str(message["transport"]))
        return {}, None

    def _tcp_listen(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self._listener = listener
        return {"port": listener.getsockname()[1]}, None

    def _tcp_accept(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        if self._listener is None:
            raise RuntimeError("tcp_listen first")
        self._listener.settimeout(30.0)
        self._tcp, _ = self._listener.accept()
        self._tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tcp.settimeout(120.0)
        return {}, None

    def _tcp_recv(self, message: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
        if self._tcp is None:
            raise RuntimeError("tcp_accept first")
        num_bytes = checked_num_bytes(int(message["num_bytes"]))
        if self._tcp_buffer.nbytes != num_bytes:
            self._tcp_buffer = np.full(num_bytes, 0, dtype=np.uint8)
        return {"ready": True}, self._receive_tcp_payload

    def _receive_tcp_payload(self) -> None:
        assert self._tcp is not None, "checked by _tcp_recv"
        view = self._tcp_buffer.data
        received = 0
        try:
            while received < view.nbytes:
                wanted = min(view.nbytes - received, SEGMENT_BYTES)
                count = self._tcp.recv_into(view[received:], wanted)
                if count == 0:
                    raise ConnectionError("the sender closed the connection mid-payload")
                received += count
            self._tcp.sendall(ACK)
        except OSError:
            # Closing makes the sender's wait for the ack fail rather than hang.
            self._tcp.close()
            self._tcp = None

    def _grpc_bytes_start(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        server = grpc.server(
            futures.ThreadPoolExecutor(2, thread_name_prefix="bytes-sink"),
            options=[("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES)],
        )
        handler = grpc.stream_unary_rpc_method_handler(self._bytes_sink.push)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(BYTES_SERVICE, {"Push": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._bytes_server = server
        return {"port": port}, None

    def _grpc_bytes_expect(self, message: dict[str, Any]) -> tuple[dict[str, Any], None]:
        self._bytes_sink.resize(checked_num_bytes(int(message["num_bytes"])))
        return {}, None

    def _stop_receiver(self, transport: str) -> None:
        receiver = self._receivers.pop(transport, None)
        if receiver is not None:
            receiver.stop()

    def shutdown(self) -> None:
        for transport in list(self._receivers):
            self._stop_receiver(transport)
        if self._bytes_server is not None:
            self._bytes_server.stop(grace=None).wait()
        for sock in (self._tcp, self._listener):
            if sock is not None:
                sock.close()


class _BytesSink:
    """The plain gRPC baseline's receive side: copies each raw message into one buffer."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)

    def resize(self, num_bytes: int) -> None:
        if self._buffer.nbytes != num_bytes:
            self._buffer = np.full(num_bytes, 0, dtype=np.uint8)

    def push(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        offset = 0
        for message in request_iterator:
            end = offset + len(message)
            if end > self._buffer.nbytes:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "more bytes than expected")
            self._buffer[offset:end] = np.frombuffer(message, dtype=np.uint8)
            offset = end
        return offset.to_bytes(8, "little")
