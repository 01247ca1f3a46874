"""Sampling: greedy, top-k, top-p, per-request seeds and min_tokens (log-probabilities are in
test_sampler_logprobs.py)."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import SamplingRow, _top_p_filter, sample, sample_tokens
from pdserve.messages import SamplingParams

VOCAB = 50


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 3


def flat_logits() -> torch.Tensor:
    """Ten equally likely tokens (ids 7, 12, ...), everything else far less likely."""
    logits = torch.full((1, VOCAB), -4.0)
    logits[0, 7::4] = 0.0
    return logits


def test_greedy_is_argmax_per_row() -> None:
    logits = random_logits(6)
    params = [SamplingParams(max_tokens=4)] * 6
    assert sample(logits, params, [0] * 6) == torch.argmax(logits, dim=-1).tolist()


def test_greedy_ignores_seed_top_k_and_top_p() -> None:
    logits = random_logits(4, seed=3)
    params = [SamplingParams(max_tokens=4, seed=s, top_k=5, top_p=0.3) for s in range(4)]
    assert sample(logits, params, [9] * 4) == torch.argmax(logits, dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_one_equals_greedy_at_any_temperature(temperature: float) -> None:
    logits = random_logits(8, seed=7)
    for seed in (None, 1, 2):
        params = [SamplingParams(max_tokens=4, temperature=temperature, top_k=1, seed=seed)] * 8
        assert sample(logits, params, list(range(8))) == torch.argmax(logits, dim=-1).tolist()


def test_mixed_batch_samples_only_the_non_greedy_rows() -> None:
    logits = torch.cat([random_logits(1, seed=1), flat_logits(), random_logits(1, seed=2)])
    params = [
        SamplingParams(max_tokens=4),
        SamplingParams(max_tokens=4, temperature=1.0, seed=5),
        SamplingParams(max_tokens=4),
    ]
    tokens = sample(logits, params, [0, 0, 0])
    assert tokens[0] == int(torch.argmax(logits[0]))
    assert tokens[2] == int(torch.argmax(logits[2]))
    alone = sample(logits[1:2], params[1:2], [0])
    assert tokens[1] == alone[0], "a row's sample must not depend on its batch"


def test_same_seed_and_step_gives_the_same_token() -> None:
    logits = flat_logits()
    for seed in range(20):
        params = [SamplingParams(max_tokens=4, temperature=1.0, seed=seed)]
        first = sample(logits, params, [3])
        assert all(sample(logits, params, [3]) == first for _ in range(5))


def test_steps_and_seeds_vary_the_draw() -> None:
    # Ten equally likely tokens: 40 independent draws that all agree would have probability
    # 10**-39, so "they are not all equal" is a robust check that the step reaches the RNG.
    logits = flat_logits()
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=42)]
    by_step = [sample(logits, params, [step])[0] for step in range(40)]
    assert len(set(by_step)) > 1
    by_seed = [
        sample(logits, [SamplingParams(max_tokens=4, temperature=1.0, seed=s)], [0])[0]
        for s in range(40)
    ]
    assert len(set(by_seed)) > 1


def test_seeded_draws_spread_over_the_allowed_tokens() -> None:
    logits = flat_logits()
    allowed = set(range(7, VOCAB, 4))
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_k=len(allowed), seed=9)]
    drawn = {sample(logits, params, [step])[0] for step in range(300)}
    assert drawn == allowed  # 300 draws miss one of 10 equal tokens with p ~ 2e-13


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_sampled_tokens_stay_inside_the_top_k(top_k: int) -> None:
    logits = random_logits(1, seed=11) / 3  # mild logits: many tokens are plausible
    top = set(torch.topk(logits[0], top_k).indices.tolist())
    for seed in range(300):
        params = [SamplingParams(max_tokens=4, temperature=2.0, top_k=top_k, seed=seed)]
        assert sample(logits, params, [seed % 7])[0] in top


def test_sampled_tokens_stay_inside_the_top_p_nucleus() -> None:
    probs = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])
    logits = torch.log(probs).unsqueeze(0)
    for seed in range(300):
        params = [SamplingParams(max_tokens=4, temperature=1.0, top_p=0.65, seed=seed)]
        assert sample(logits, params, [0])[0] in {1, 3}


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.1, {2}),
        (0.5, {2}),
        (0.51, {2, 0}),
        (0.75, {2, 0}),
        (0.8, {2, 0, 3}),
        (0.90625, {2, 0, 3}),
        (0.95, {2, 0, 3, 1}),
        (0.999, {2, 0, 3, 1}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p: float, kept: set[int]) -> None:
    # Sorted: token 2 (1/2), token 0 (1/4), token 3 (5/32), token 1 (3/32); all exact in binary,
    # so the cumulative masses 0.5, 0.75, 0.90625, 1.0 have no rounding error.
    probs = torch.tensor([0.25, 0.09375, 0.5, 0.15625])
    filtered = _top_p_filter(probs.clone(), top_p)
    assert {i for i, p in enumerate(filtered.tolist()) if p > 0} == kept
    assert float(filtered.sum()) == pytest.approx(1.0)
    mass = sum(float(probs[i]) for i in kept)
    for i in kept:
        assert float(filtered[i]) == pytest.approx(float(probs[i]) / mass)


def test_default_top_p_and_top_k_filter_nothing() -> None:
    logits = random_logits(1, seed=5)
    drawn = {
        sample(logits, [SamplingParams(max_tokens=4, temperature=50.0, seed=s)], [0])[0]
        for s in range(400)
    }
    assert len(drawn) > 10  # at a high temperature many tokens appear


@pytest.mark.parametrize("temperature", [3.92e-43, 1e-30, 9e-6])
def test_tiny_positive_temperature_samples_greedily(temperature: float) -> None:
    # Found by the fuzzed-request test: logits / 3.9e-43 overflowed into NaN probabilities.
    logits = torch.tensor([[1.0, 30.0, -5.0, 29.5]])
    params = [SamplingParams(temperature=temperature, max_tokens=4, seed=1)]
    assert sample(logits, params, [0]) == [1]


# min_tokens: EOS and stop ids cannot be sampled while fewer tokens were generated.

EOS = 3
STOP = 8


def eos_favoured_logits() -> torch.Tensor:
    """EOS far ahead, then the stop id, then token 20; everything else unlikely."""
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, EOS], logits[0, STOP], logits[0, 20] = 30.0, 25.0, 20.0
    return logits


def sampled_ids(logits: torch.Tensor, sampling: SamplingParams, num_generated: int) -> int:
    row = SamplingRow(sampling, num_generated, [EOS])
    return sample_tokens(logits, [row])[0].token_id


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(temperature: float) -> None:
    logits = eos_favoured_logits()
    sampling = SamplingParams(
        max_tokens=10, temperature=temperature, seed=1, min_tokens=2, stop_token_ids=[STOP]
    )
    assert [sampled_ids(logits, sampling, n) for n in range(4)] == [20, 20, EOS, EOS]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ignore_eos_leaves_eos_to_the_model_but_still_masks_stop_ids(temperature: float) -> None:
    logits = eos_favoured_logits()
    sampling = SamplingParams(
        max_tokens=10, temperature=temperature, seed=2, min_tokens=5, stop_token_ids=[STOP],
        ignore_eos=True,
    )
    assert sampled_ids(logits, sampling, 0) == EOS
    only_stop = SamplingParams(max_tokens=10, temperature=temperature, seed=2, min_tokens=5)
    logits[0, EOS] = -10.0  # now the stop id leads, but this request has none
    assert sampled_ids(logits, only_stop, 0) == STOP


def test_sampled_rows_never_draw_a_masked_token() -> None:
    logits = flat_logits()  # ten equally likely tokens: 7, 11, ..., 43, 47
    eos_and_stops = {7, 11, 15}
    for seed in range(200):
        sampling = SamplingParams(
            max_tokens=10, temperature=1.0, seed=seed, min_tokens=1, stop_token_ids=[11, 15]
        )
        row = SamplingRow(sampling, 0, [7])
        assert sample_tokens(logits, [row])[0].token_id not in eos_and_stops


def test_min_tokens_in_a_batch_masks_only_its_own_rows() -> None:
    logits = eos_favoured_logits().repeat(3, 1)
    rows = [
        SamplingRow(SamplingParams(max_tokens=10, min_tokens=4), 1, [EOS]),
        SamplingRow(SamplingParams(max_tokens=10), 1, [EOS]),
        SamplingRow(SamplingParams(max_tokens=10, min_tokens=1), 1, [EOS]),  # reached
    ]
    assert [t.token_id for t in sample_tokens(logits, rows)] == [STOP, EOS, EOS]


def test_ids_outside_the_vocabulary_are_ignored() -> None:
    sampling = SamplingParams(max_tokens=4, min_tokens=3, stop_token_ids=[VOCAB, 10**9, -1])
    row = SamplingRow(sampling, 0, [EOS, VOCAB + 5])
    assert sample_tokens(eos_favoured_logits(), [row])[0].token_id == STOP


def test_seeded_draws_past_min_tokens_are_those_without_min_tokens() -> None:
    logits = flat_logits()
    for seed in range(50):
        plain = SamplingParams(max_tokens=4, temperature=1.0, seed=seed)
        with_min = SamplingParams(
            max_tokens=4, temperature=1.0, seed=seed, min_tokens=2, stop_token_ids=[7]
        )
        assert sample(logits, [plain], [2]) == sample(logits, [with_min], [2])
