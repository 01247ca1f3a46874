"""One contiguous buffer for the packed weights of a model, in the order a forward pass reads
them.

A decode step's time is the time to stream every weight once. Measured on AMD EPYC (Zen 4)
with SmolLM2-135M fp32 at batch 1: the native products read 211 separately allocated packed
weights at ~20 GB/s with 1 thread and ~25 GB/s with 2; the same weights laid end to end in one
buffer, in call order, read at ~25 and ~30 GB/s (and torch's own sum over the separate
tensors is as slow as over the one buffer is fast: the layout, not the kernel). The loader
moves the weights once, after the lean forward has fused its products.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kernels.linear import FusedNativeLinear, NativeLinear

WeightHolder = NativeLinear | FusedNativeLinear


def move_into_arena(holders: Sequence[WeightHolder]) -> int:
    """Copies every holder's packed weight, in order, into one new buffer and points the
    holder at its slice (the old tensors are freed). Holders must be distinct and all of one
    dtype; a member of a fused product moves with it (pass the fused one). Returns the bytes
    moved."""
    if not holders:
        return 0
    dtypes = {holder.packed.dtype for holder in holders}
    if len(dtypes) != 1:
        raise ValueError(f"one arena holds one dtype, not {sorted(map(str, dtypes))}")
    arena = torch.empty(sum(holder.packed.numel() for holder in holders), dtype=dtypes.pop())
    start = 0
    for holder in holders:
        size = holder.packed.numel()
        moved = arena[start : start + size].view(holder.packed.shape)
        moved.copy_(holder.packed)
        holder.move_packed(moved)
        start += size
    return arena.numel() * arena.element_size()
