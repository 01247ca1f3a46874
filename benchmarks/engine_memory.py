"""The memory-bandwidth roofline of batch-1 decode: every step reads every weight once, so
tokens/s cannot exceed (memory bandwidth) / (weight bytes read per step)."""

from __future__ import annotations

import time

import torch

MIB = 1024 * 1024


def measure_copy_bandwidth(num_mib: int, repeats: int) -> dict[str, float]:
    """Best of `repeats` `dst.copy_(src)` over `num_mib` MiB with the current torch threads;
    bytes read + bytes written per second (how the repo's baselines count it)."""
    if num_mib < 1 or repeats < 1:
        raise ValueError("need num_mib >= 1 and repeats >= 1")
    src = torch.ones(num_mib * MIB // 4, dtype=torch.float32)  # ones: pages really mapped
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst outside the timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - started)
    num_bytes = 2 * src.numel() * src.element_size()
    return {
        "num_bytes_moved": float(num_bytes),
        "best_s": min(times),
        "gb_per_s": num_bytes / min(times) / 1e9,
    }


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter once (tied embeddings are
    one tensor), except an untied input embedding, of which a step reads one row per token."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    output = model.get_output_embeddings()  # type: ignore[operator]
    if output is None or output.weight is not embeddings.weight:
        total -= embeddings.weight.numel() * embeddings.weight.element_size()
    return int(total)
