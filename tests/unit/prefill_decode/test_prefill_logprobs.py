"""Log-probabilities, min_tokens and cached-prefix counts through a PrefillWorker and a
DecodeWorker (the real tiny model): the first token's log-probabilities travel in the
`first_token` event, later ones in the decode events, and both equal transformers'."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdserve.messages import DecodeEvent, PrefillEvent, SamplingParams, TokenLogprobs
from tests.factories.model import EOS_TOKEN_ID
from tests.factories.prefill_pair import (
    NUM_NEW_TOKENS,
    PROMPTS,
    SUFFIXES,
    SYSTEM_PROMPT,
    Pair,
    cached_tokens_of,
    greedy,
    output_tokens,
    serve,
)

TOP_LOGPROBS = 3
# pdserve's paged attention and transformers' eager attention round differently.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_logprobs(model: torch.nn.Module, prompt: list[int], output: list[int]):
    """`[len(output), vocab]`: the log-distribution each output token was drawn from."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output[:-1]])).logits[0, len(prompt) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def all_logprobs(
    prefill_events: list[PrefillEvent], decode_events: list[DecodeEvent]
) -> list[TokenLogprobs]:
    first = prefill_events[0].logprobs
    assert first is not None, "the first token's log-probabilities come from prefill"
    return [first] + [lp for event in decode_events for lp in event.logprobs]


@pytest.mark.parametrize("prompt", PROMPTS[:2], ids=["6-tokens", "1-token"])
async def test_logprobs_of_every_token_match_transformers(
    pair: Pair, hf_model: torch.nn.Module, prompt: list[int]
) -> None:
    sampling = greedy(logprobs=True, top_logprobs=TOP_LOGPROBS)
    prefill_events, decode_events = await serve(pair, prompt, sampling)
    output = output_tokens(prefill_events, decode_events)
    found = all_logprobs(prefill_events, decode_events)
    for event in decode_events:
        assert [lp.token_id for lp in event.logprobs] == event.token_ids
    assert [lp.token_id for lp in found] == output
    expected = reference_logprobs(hf_model, prompt, output)
    for position, logprobs in enumerate(found):
        row = expected[position]
        assert logprobs.logprob == pytest.approx(float(row[output[position]]), abs=TOLERANCE)
        top = torch.topk(row, TOP_LOGPROBS)
        assert logprobs.top_token_ids == top.indices.tolist()
        assert logprobs.top_logprobs == pytest.approx(top.values.tolist(), abs=TOLERANCE)
    pair.assert_quiet()


async def test_without_logprobs_no_event_carries_any(pair: Pair) -> None:
    prefill_events, decode_events = await serve(pair, PROMPTS[0], greedy())
    assert all(event.logprobs is None for event in prefill_events)
    assert all(event.logprobs == [] for event in decode_events)
    pair.assert_quiet()


async def test_first_token_reports_the_prompt_tokens_served_from_the_prefix_cache(
    pair: Pair,
) -> None:
    cold, warm = (SYSTEM_PROMPT + suffix for suffix in SUFFIXES[:2])
    cold_events, _ = await serve(pair, cold, greedy(2))
    warm_events, _ = await serve(pair, warm, greedy(2))
    assert cold_events[0].kind == warm_events[0].kind == "first_token"
    assert cold_events[0].num_cached_tokens == 0
    assert warm_events[0].num_cached_tokens == cached_tokens_of(SYSTEM_PROMPT) > 0
    pair.assert_quiet()


async def test_without_a_prefix_cache_no_prompt_token_is_cached(uncached_pair: Pair) -> None:
    for suffix in SUFFIXES[:2]:
        prefill_events, _ = await serve(uncached_pair, SYSTEM_PROMPT + suffix, greedy(2))
        assert prefill_events[0].num_cached_tokens == 0
    uncached_pair.assert_quiet()


@pytest.mark.parametrize("as_stop_id", [False, True], ids=["eos", "stop-id"])
async def test_min_tokens_outlasts_a_greedy_eos_and_matches_transformers(
    pair: Pair, hf_model: torch.nn.Module, as_stop_id: bool
) -> None:
    prompt = PROMPTS[0]
    unconstrained = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=1, do_sample=False, pad_token_id=1
    )[0, len(prompt) :].tolist()
    stop = unconstrained[0]  # greedy decoding would stop at once on this token
    min_tokens = 4
    # transformers' min_new_tokens masks every EOS id: the model's (0) and `stop`.
    expected = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=min_tokens,
        do_sample=False, eos_token_id=[stop, EOS_TOKEN_ID], pad_token_id=1,
    )[0, len(prompt) :].tolist()
    sampling = SamplingParams(max_tokens=NUM_NEW_TOKENS, min_tokens=min_tokens)
    eos_token_ids: tuple[int, ...] = (stop, EOS_TOKEN_ID)
    if as_stop_id:  # the request names `stop`; the model's EOS is only 0
        sampling = dataclasses.replace(sampling, stop_token_ids=[stop])
        eos_token_ids = (EOS_TOKEN_ID,)
    prefill_events, decode_events = await serve(pair, prompt, sampling, eos_token_ids=eos_token_ids)
    output = output_tokens(prefill_events, decode_events)
    assert output == expected
    assert len(output) > min_tokens and stop not in output[:min_tokens]
    pair.assert_quiet()
