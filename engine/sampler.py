"""Token sampling: greedy, temperature, top-k and top-p, reproducible per request seed, with
min_tokens and per-token log-probabilities.

A seeded request draws its n-th generated token with a generator seeded from (seed, n), so
the same seed gives the same output whether the token is sampled by the prefill replica (n=0)
or by any decode replica later, and however requests are batched.

Log-probabilities are those of the model: `log_softmax` of a row's raw logits, before
temperature, top-k/top-p and min_tokens change the distribution sampled from (vLLM's default).
Rows that are greedy, ask for no log-probabilities and have reached their min_tokens share one
batched argmax: the common decode step pays nothing for the other features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pdserve.messages import SamplingParams, TokenLogprobs

_SEED_STRIDE = 1_000_003  # spreads (seed, n) pairs apart; any odd constant works


class SamplingRow(NamedTuple):
    """What sampling needs to know about one row's request."""

    sampling: SamplingParams
    # Tokens the request generated before this one (the seed step and the min_tokens count).
    num_generated: int
    # The model's EOS ids for this request: masked, with `stop_token_ids`, below min_tokens.
    eos_token_ids: Sequence[int] = ()


class SampledToken(NamedTuple):
    token_id: int
    # Only when the row's `sampling.logprobs` is set.
    logprobs: TokenLogprobs | None = None


def sample_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Picks one token per row of float32 `logits` `[batch, vocab]` (`rows[i]` describes row
    i), with its log-probabilities where the row asked for them. Reads `logits` only."""
    # max(dim).indices: the first maximal index, like argmax, in ~60% of argmax's time on CPU.
    token_ids: list[int] = logits.max(dim=-1).indices.tolist()
    for index, row in enumerate(rows):
        if not row.sampling.greedy or _below_min_tokens(row):
            token_ids[index] = _sample_row(logits[index], row)
    asking = [index for index, row in enumerate(rows) if row.sampling.logprobs]
    if not asking:
        return [SampledToken(token_id) for token_id in token_ids]
    found = _token_logprobs(logits, asking, rows, token_ids)
    return [SampledToken(token_id, found.get(index)) for index, token_id in enumerate(token_ids)]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], num_generated: list[int]
) -> list[int]:
    """Token ids only, for callers that know no EOS ids (benchmarks, engine tests): there
    min_tokens masks only `stop_token_ids`. Request paths call `sample_tokens`.

    `num_generated[i]` is how many tokens row i's request has generated before this one."""
    rows = [SamplingRow(sampling, count) for sampling, count in zip(params, num_generated)]
    return [sampled.token_id for sampled in sample_tokens(logits, rows)]


def _below_min_tokens(row: SamplingRow) -> bool:
    return row.num_generated < row.sampling.min_tokens


def _sample_row(logits: torch.Tensor, row: SamplingRow) -> int:
    """One row that is not plain greedy: masked below min_tokens, then greedy or drawn."""
    if _below_min_tokens(row):
        logits = _mask_stops(logits, row)
    if row.sampling.greedy:
        return int(logits.max(dim=-1).indices)
    return _draw(logits, row.sampling, row.num_generated)


def _mask_stops(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """A copy of `logits` where the row's EOS (unless `ignore_eos`) and stop ids cannot win."""
    stops = set(row.sampling.stop_token_ids)
    if not row.sampling.ignore_eos:
        stops.update(row.eos_token_ids)
    # Ids outside the vocabulary cannot be sampled anyway; indexing with them would fail the
    # whole batch's step.
    in_vocab = [token_id for token_id in stops if 0 <= token_id < logits.shape[-1]]
    if not in_vocab:
        return logits
    masked = logits.clone()
    masked[in_vocab] = float("-inf")
    return masked


def _draw(logits: torch.Tensor, sampling: SamplingParams, step: int) -> int:
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


def _token_logprobs(
    logits: torch.Tensor,
    asking: list[int],
    rows: Sequence[SamplingRow],
    token_ids: list[int],
) -> dict[int, TokenLogprobs]:
    """`TokenLogprobs` of the rows listed in `asking`, by row index: one batched log_softmax
    and one top-k over just those rows."""
    scored = logits if len(asking) == logits.shape[0] else logits[asking]  # copy only a subset
    logprobs = torch.log_softmax(scored.float(), dim=-1)  # [len(asking), vocab]
    chosen = torch.tensor([token_ids[index] for index in asking]).unsqueeze(-1)
    chosen_logprobs = logprobs.gather(-1, chosen).squeeze(-1).tolist()
    num_top = min(max(rows[index].sampling.top_logprobs for index in asking), logprobs.shape[-1])
    top_ids: list[list[int]] = [[] for _ in asking]
    top_logprobs: list[list[float]] = [[] for _ in asking]
    if num_top > 0:
        top = torch.topk(logprobs, num_top, dim=-1)  # sorted: most likely first
        top_ids, top_logprobs = top.indices.tolist(), top.values.tolist()
    found: dict[int, TokenLogprobs] = {}
    for position, index in enumerate(asking):
        wanted = max(0, rows[index].sampling.top_logprobs)
        found[index] = TokenLogprobs(
            token_id=token_ids[index],
            logprob=chosen_logprobs[position],
            top_token_ids=top_ids[position][:wanted],
            top_logprobs=top_logprobs[position][:wanted],
        )
    return found
