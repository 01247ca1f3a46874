"""When a sequence stops: EOS, ignore_eos, stop token ids and length."""

from __future__ import annotations

import pytest

from engine.stopping import FINISH_LENGTH, FINISH_STOP, finish_reason
from pdserve.messages import SamplingParams

EOS = [2, 9]


def test_ordinary_token_below_max_tokens_does_not_finish() -> None:
    sampling = SamplingParams(max_tokens=5)
    assert [finish_reason(40, n, sampling, EOS) for n in range(1, 5)] == [""] * 4


@pytest.mark.parametrize("eos", EOS)
def test_any_eos_token_stops(eos: int) -> None:
    assert finish_reason(eos, 1, SamplingParams(max_tokens=5), EOS) == FINISH_STOP


def test_eos_stops_before_length_on_the_last_token() -> None:
    assert finish_reason(2, 5, SamplingParams(max_tokens=5), EOS) == FINISH_STOP


def test_ignore_eos_continues_past_eos() -> None:
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    assert finish_reason(2, 1, sampling, EOS) == ""
    assert finish_reason(9, 4, sampling, EOS) == ""
    assert finish_reason(2, 5, sampling, EOS) == FINISH_LENGTH


def test_without_eos_ids_eos_like_tokens_are_ordinary() -> None:
    assert finish_reason(2, 1, SamplingParams(max_tokens=5), []) == ""


def test_stop_token_ids_stop() -> None:
    sampling = SamplingParams(max_tokens=5, stop_token_ids=[17, 33])
    assert finish_reason(17, 1, sampling, EOS) == FINISH_STOP
    assert finish_reason(33, 2, sampling, EOS) == FINISH_STOP
    assert finish_reason(18, 2, sampling, EOS) == ""


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    sampling = SamplingParams(max_tokens=5, stop_token_ids=[17], ignore_eos=True)
    assert finish_reason(17, 1, sampling, EOS) == FINISH_STOP
    assert finish_reason(2, 1, sampling, EOS) == ""


def test_length_at_exactly_max_tokens() -> None:
    sampling = SamplingParams(max_tokens=3)
    assert finish_reason(40, 2, sampling, EOS) == ""
    assert finish_reason(40, 3, sampling, EOS) == FINISH_LENGTH
    assert finish_reason(40, 1, SamplingParams(max_tokens=1), EOS) == FINISH_LENGTH
