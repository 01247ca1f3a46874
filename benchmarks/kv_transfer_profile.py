"""Where the gRPC transport's time goes: each per-byte step of its send and receive paths,
timed alone in this process over the chunks of one transfer.

Sender (gRPC's request thread): CRC32C of the chunk, `bytes(view)` in the codec, building the
KVMessage, `SerializeToString`. Receiver (a server thread): `KVMessage.FromString`, reading
`chunk.data`, CRC32C again, the sink's copy. gRPC's own framing and socket copies are in the
plain gRPC bytes baseline instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import crc32c
import numpy as np

from benchmarks.kv_transfer_buffers import LAYOUT, ScatterSink, StreamSource
from kvtransfer import ChunkSpec, plan_chunks
from pdserve.internal.v1 import kv_transfer_pb2

SENDER_STEPS = ("crc32c", "bytes_copy", "proto_build", "proto_serialize")
RECEIVER_STEPS = ("proto_parse", "data_access", "crc32c_receiver", "sink_write")


def _chunk_message(spec: ChunkSpec, data: bytes) -> kv_transfer_pb2.KVMessage:
    return kv_transfer_pb2.KVMessage(chunk=kv_transfer_pb2.KVChunk(
        seq=spec.seq, layer_start=spec.layer_start, layer_end=spec.layer_end,
        token_start=spec.token_start, token_end=spec.token_end, crc32c=0, data=data,
    ))


def _time_over_chunks(step: Callable[[int], object], num_chunks: int, repeats: int) -> float:
    """Median seconds of running `step(i)` for every chunk i of one transfer."""
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(num_chunks):
            step(index)
        times_s.append(time.perf_counter() - start)
    return statistics.median(times_s)


def profile_grpc_steps(
    num_tokens: int, payload: np.ndarray, chunk_bytes: int, repeats: int
) -> dict[str, object]:
    """Seconds per transfer (and GB/s) of each step, and each side's total."""
    chunks = plan_chunks(LAYOUT, num_tokens, chunk_bytes)
    source = StreamSource(num_tokens, payload)
    views = [source.read(spec) for spec in chunks]
    copies = [bytes(view) for view in views]
    messages = [_chunk_message(spec, data) for spec, data in zip(chunks, copies)]
    wires = [message.SerializeToString() for message in messages]
    parsed = [kv_transfer_pb2.KVMessage.FromString(wire) for wire in wires]
    received = [message.chunk.data for message in parsed]
    sink = ScatterSink(num_tokens)
    steps: dict[str, Callable[[int], object]] = {
        "crc32c": lambda i: crc32c.crc32c(views[i]),
        "bytes_copy": lambda i: bytes(views[i]),
        "proto_build": lambda i: _chunk_message(chunks[i], copies[i]),
        "proto_serialize": lambda i: messages[i].SerializeToString(),
        "proto_parse": lambda i: kv_transfer_pb2.KVMessage.FromString(wires[i]),
        "data_access": lambda i: parsed[i].chunk.data,
        "crc32c_receiver": lambda i: crc32c.crc32c(received[i]),
        "sink_write": lambda i: sink.write(chunks[i], memoryview(received[i])),
    }
    num_bytes = payload.nbytes
    seconds = {name: _time_over_chunks(step, len(chunks), repeats) for name, step in steps.items()}
    report: dict[str, object] = {
        name: {"s_per_transfer": s, "gb_per_s": num_bytes / s / 1e9} for name, s in seconds.items()
    }
    sender_s = sum(seconds[name] for name in SENDER_STEPS)
    receiver_s = sum(seconds[name] for name in RECEIVER_STEPS)
    report["sender_total"] = {"s_per_transfer": sender_s, "gb_per_s": num_bytes / sender_s / 1e9}
    report["receiver_total"] = {
        "s_per_transfer": receiver_s, "gb_per_s": num_bytes / receiver_s / 1e9
    }
    report["num_tokens"] = num_tokens
    report["num_chunks"] = len(chunks)
    return report
