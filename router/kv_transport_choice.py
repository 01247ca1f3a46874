"""Which KV transport one hand-off uses, given the configured one and where the pair runs."""

from __future__ import annotations

from pdserve.errors import FailedPrecondition


def kv_transport_for(configured: str, prefill_node: str, decode_node: str) -> str:
    """The transport for one hand-off: `auto` takes shared memory within a node and gRPC
    across nodes; an explicit `shm` across nodes is refused, never silently replaced."""
    same_node = bool(prefill_node) and prefill_node == decode_node
    if configured == "auto":
        return "shm" if same_node else "grpc"
    if configured == "shm" and not same_node:
        raise FailedPrecondition(
            "kv_transfer.transport is shm but the chosen prefill and decode replicas are on "
            "different nodes"
        )
    return configured
