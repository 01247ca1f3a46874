"""Log-probabilities from the sampler: the raw model distribution (before temperature, top-k,
top-p and min_tokens), the sampled token's and the most likely ones, only for rows that ask."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.sampler import SampledToken, SamplingRow, sample, sample_tokens
from pdserve.messages import SamplingParams, TokenLogprobs

VOCAB = 50
EOS = 3
TOLERANCE = 1e-6


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 3


def asking(top_logprobs: int = 0, **fields: object) -> SamplingParams:
    return SamplingParams(max_tokens=8, logprobs=True, top_logprobs=top_logprobs, **fields)


def only(logits: torch.Tensor, sampling: SamplingParams, num_generated: int = 0) -> SampledToken:
    return sample_tokens(logits, [SamplingRow(sampling, num_generated, [EOS])])[0]


def assert_matches_log_softmax(logits: torch.Tensor, sampled: SampledToken) -> TokenLogprobs:
    """`logits` is the row's `[vocab]`; checks the sampled token's and the top entries."""
    expected = torch.log_softmax(logits.float(), dim=-1)
    found = sampled.logprobs
    assert found is not None
    assert found.token_id == sampled.token_id
    assert found.logprob == pytest.approx(float(expected[sampled.token_id]), abs=TOLERANCE)
    for token_id, logprob in zip(found.top_token_ids, found.top_logprobs):
        assert logprob == pytest.approx(float(expected[token_id]), abs=TOLERANCE)
    return found


def test_greedy_rows_get_the_log_softmax_of_their_token_and_the_top_tokens() -> None:
    logits = random_logits(4, seed=1)
    sampled = sample_tokens(logits, [SamplingRow(asking(top_logprobs=5), 0)] * 4)
    for row, token in enumerate(sampled):
        assert token.token_id == int(torch.argmax(logits[row]))
        found = assert_matches_log_softmax(logits[row], token)
        assert found.top_token_ids == torch.topk(logits[row], 5).indices.tolist()
        assert found.top_logprobs == sorted(found.top_logprobs, reverse=True)
        assert found.top_token_ids[0] == token.token_id


def test_sampled_rows_get_the_log_softmax_of_what_they_drew() -> None:
    logits = random_logits(1, seed=2) / 3  # mild: draws vary
    drawn = set()
    for seed in range(40):
        token = only(logits, asking(top_logprobs=3, temperature=1.5, seed=seed))
        drawn.add(token.token_id)
        assert_matches_log_softmax(logits[0], token)
    assert len(drawn) > 1, "the draws must not all be the most likely token"


def test_temperature_top_k_and_top_p_do_not_change_the_logprobs() -> None:
    logits = random_logits(1, seed=3)
    greedy = only(logits, asking(top_logprobs=20)).logprobs
    for temperature, top_k, top_p in [(0.3, 0, 1.0), (2.0, 5, 1.0), (1.0, 0, 0.5), (5.0, 2, 0.9)]:
        sampling = asking(
            top_logprobs=20, temperature=temperature, top_k=top_k, top_p=top_p, seed=4
        )
        found = only(logits, sampling).logprobs
        assert found is not None and greedy is not None
        assert found.top_token_ids == greedy.top_token_ids
        assert found.top_logprobs == greedy.top_logprobs


def test_a_drawn_token_outside_the_top_list_still_gets_its_own_logprob() -> None:
    logits = -0.01 * torch.arange(VOCAB, dtype=torch.float32).unsqueeze(0)  # 0, then 1, ...
    outside = 0
    for seed in range(30):
        token = only(logits, asking(top_logprobs=2, temperature=100.0, seed=seed))
        found = assert_matches_log_softmax(logits[0], token)
        assert found.top_token_ids == [0, 1]
        outside += token.token_id not in found.top_token_ids
    assert outside > 0, "nearly uniform draws over 50 tokens must leave the top two"


def test_zero_top_logprobs_gives_empty_lists() -> None:
    found = only(random_logits(1), asking(top_logprobs=0)).logprobs
    assert found is not None and found.top_token_ids == [] and found.top_logprobs == []


def test_more_top_logprobs_than_the_vocabulary_lists_the_whole_vocabulary() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    found = only(logits, asking(top_logprobs=20)).logprobs
    assert found is not None and found.top_token_ids == [1, 0, 2]


def test_min_tokens_masks_the_draw_but_not_the_logprobs() -> None:
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, EOS], logits[0, 9] = 10.0, 4.0
    token = only(logits, asking(top_logprobs=2, min_tokens=3), num_generated=1)
    assert token.token_id == 9
    found = assert_matches_log_softmax(logits[0], token)
    assert found.top_token_ids == [EOS, 9], "the model's distribution, EOS included"


def test_only_the_rows_that_ask_get_logprobs_each_with_its_own_count() -> None:
    logits = random_logits(5, seed=6)
    rows = [
        SamplingRow(SamplingParams(max_tokens=8), 0),
        SamplingRow(asking(top_logprobs=2), 0),
        SamplingRow(SamplingParams(max_tokens=8, temperature=1.0, seed=1), 0),
        SamplingRow(asking(top_logprobs=0, temperature=1.0, seed=2), 3),
        SamplingRow(asking(top_logprobs=7), 0),
    ]
    sampled = sample_tokens(logits, rows)
    assert [t.logprobs is not None for t in sampled] == [False, True, False, True, True]
    counts = [len(t.logprobs.top_token_ids) for t in sampled if t.logprobs is not None]
    assert counts == [2, 0, 7]
    for row, token in enumerate(sampled):
        if token.logprobs is not None:
            assert_matches_log_softmax(logits[row], token)
    # Asking for logprobs changes no token: the same rows without them sample the same ids.
    plain = [r._replace(sampling=dataclasses.replace(r.sampling, logprobs=False)) for r in rows]
    assert [t.token_id for t in sample_tokens(logits, plain)] == [t.token_id for t in sampled]


def test_sample_keeps_returning_token_ids() -> None:
    logits = random_logits(3, seed=7)
    params = [SamplingParams(max_tokens=4), asking(2), SamplingParams(max_tokens=4)]
    assert sample(logits, params, [0, 0, 0]) == torch.argmax(logits, dim=-1).tolist()


def test_bfloat16_logits_are_scored_in_float32() -> None:
    logits = random_logits(2, seed=8).to(torch.bfloat16)
    for row, token in enumerate(sample_tokens(logits, [SamplingRow(asking(3), 0)] * 2)):
        assert_matches_log_softmax(logits[row], token)
