"""Moving one request's KV cache from a prefill replica to a decode replica.

Public face: the layout and chunk plan, the source/sink/sender/receiver interfaces, the
errors, and factories that import the chosen transport lazily ("grpc", "shm", "inproc" or
"nccl"). Imports neither torch nor Ray; grpc only when a gRPC-based transport is chosen, torch
only when "nccl" is.
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
# for "auto" accepts both. "nccl" moves chunk bytes over torch.distributed pair groups (NCCL for
# KV on a GPU, gloo for KV on the CPU); only a receiver made for "nccl" accepts it.
TRANSPORTS = ("grpc", "shm", "inproc", "nccl")

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


def make_sender(transport: str, config: KVTransferConfig, kv_device: str = "cpu") -> KVSender:
    """A sender for `transport`; raises ValueError naming the valid choices.

    `kv_device` ("cpu" or "cuda[:N]") says where the KV lives; only "nccl" uses it (NCCL on a
    CUDA device, gloo on the CPU) and raises ValueError for CUDA without CUDA.
    """
    if transport == "nccl":
        from kvtransfer.dist_sender import DistSender

        return DistSender(config, kv_device)
    if transport in ("grpc", "shm"):
        from kvtransfer.grpc_sender import GrpcSender

        return GrpcSender(config, via_shm=transport == "shm")
    if transport == "inproc":
        from kvtransfer.inproc import InprocSender

        return InprocSender(config)
    raise ValueError(_unknown(transport))


def make_receiver(
    transport: str, layout: KVLayout, config: KVTransferConfig, kv_device: str = "cpu"
) -> KVReceiver:
    """A receiver (not started) for `transport`; raises ValueError naming the valid choices.
    `kv_device` as for `make_sender`."""
    if transport == "nccl":
        from kvtransfer.dist_receiver import DistReceiver

        return DistReceiver(layout, config, kv_device)
    if transport in ("grpc", "shm", "auto"):
        from kvtransfer.grpc_receiver import GrpcReceiver

        return GrpcReceiver(layout, config, allow_shm=transport != "grpc")
    if transport == "inproc":
        from kvtransfer.inproc import InprocReceiver

        return InprocReceiver(layout, config)
    raise ValueError(_unknown(transport))


def _unknown(transport: str) -> str:
    return f"transport: unknown {transport!r}, valid choices are {', '.join(TRANSPORTS)}"
