"""Moving one request's KV cache from a prefill replica to a decode replica.

Public face: the layout and chunk plan, the source/sink/sender/receiver interfaces, the
errors, and factories that import the chosen transport lazily ("grpc" or "inproc").
Imports neither torch nor Ray; grpc only when the grpc transport is chosen.
"""

from __future__ import annotations

from kvtransfer.base import (
    KVReceiver,
    KVSender,
    KVSink,
    KVSource,
    TransferResult,
    TransferStats,
)
from kvtransfer.errors import TransferError
from kvtransfer.layout import WIRE_FORMAT_VERSION, ChunkSpec, KVLayout, plan_chunks
from pdserve.config import KVTransferConfig

# "auto" is resolved per request (shm for a same-node pair, grpc otherwise); a receiver made
# for "auto" accepts both.
TRANSPORTS = ("grpc", "shm", "inproc")

__all__ = [
    "TRANSPORTS",
    "WIRE_FORMAT_VERSION",
    "ChunkSpec",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "KVSink",
    "KVSource",
    "TransferError",
    "TransferResult",
    "TransferStats",
    "make_receiver",
    "make_sender",
    "plan_chunks",
]


def make_sender(transport: str, config: KVTransferConfig) -> KVSender:
    """A sender for `transport`; raises ValueError naming the valid choices."""
    if transport in ("grpc", "shm"):
        from kvtransfer.grpc_sender import GrpcSender

        return GrpcSender(config, via_shm=transport == "shm")
    if transport == "inproc":
        from kvtransfer.inproc import InprocSender

        return InprocSender(config)
    raise ValueError(_unknown(transport))


def make_receiver(transport: str, layout: KVLayout, config: KVTransferConfig) -> KVReceiver:
    """A receiver (not started) for `transport`; raises ValueError naming the valid choices."""
    if transport in ("grpc", "shm", "auto"):
        from kvtransfer.grpc_receiver import GrpcReceiver

        return GrpcReceiver(layout, config, allow_shm=transport != "grpc")
    if transport == "inproc":
        from kvtransfer.inproc import InprocReceiver

        return InprocReceiver(layout, config)
    raise ValueError(_unknown(transport))


def _unknown(transport: str) -> str:
    return f"transport: unknown {transport!r}, valid choices are {', '.join(TRANSPORTS)}"
