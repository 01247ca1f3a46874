"""Token sampling: greedy, temperature, top-k and top-p, reproducible per request seed.

A seeded request draws its n-th generated token with a generator seeded from (seed, n), so
the same seed gives the same output whether the token is sampled by the prefill replica (n=0)
or by any decode replica later, and however requests are batched.
"""

from __future__ import annotations

import torch

from pdserve.messages import SamplingParams

_SEED_STRIDE = 1_000_003  # spreads (seed, n) pairs apart; any odd constant works


def sample(
    logits: torch.Tensor, params: list[SamplingParams], num_generated: list[int]
) -> list[int]:
    """Picks one token per row of float32 `logits` `[batch, vocab]`.

    `num_generated[i]` is how many tokens row i's request has generated before this one."""
    # max(dim).indices: the first maximal index, like argmax, in ~60% of argmax's time on CPU.
    token_ids = logits.max(dim=-1).indices.tolist()
    for row, sampling in enumerate(params):
        if not sampling.greedy:
            token_ids[row] = _sample_row(logits[row], sampling, num_generated[row])
    return token_ids


def _sample_row(logits: torch.Tensor, sampling: SamplingParams, step: int) -> int:
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if sampling.top_p < 1.0:
        probs = _top_p_filter(probs, sampling.top_p)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed((sampling.seed + step * _SEED_STRIDE) % 2**63)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches `top_p`."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    filtered = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return filtered / filtered.sum()
