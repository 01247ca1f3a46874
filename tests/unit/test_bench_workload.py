"""Benchmark workloads: length specs, seeded sampling, ShareGPT parsing, arrival processes and
the `pdserve bench serve` flags."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pdserve import cli
from pdserve.bench import options_from_args, options_to_argv
from pdserve.bench.arrivals import periodic_arrivals, poisson_arrivals
from pdserve.bench.lengths import LengthDistribution
from pdserve.bench.sharegpt import estimate_tokens, load_sharegpt, parse_sharegpt
from pdserve.bench.stats import percentile
from pdserve.bench.workload import LONG, MAIN, ShareGPTWorkload, SyntheticWorkload
from pdserve.errors import InvalidArgument


def _draws(spec: str, count: int, seed: int = 0) -> list[int]:
    distribution = LengthDistribution.parse(spec)
    rng = random.Random(seed)
    return [distribution.sample(rng) for _ in range(count)]


@pytest.mark.parametrize("spec", ["fixed:7", "uniform:3:9", "longtail:100:2000"])
def test_spec_round_trips(spec: str) -> None:
    assert LengthDistribution.parse(spec).spec == spec


@pytest.mark.parametrize(
    "spec",
    ["fixed:0", "fixed:", "fixed:1:2", "uniform:9:3", "uniform:a:b", "uniform:4",
     "longtail:50:10", "longtail:-1:10", "gauss:1:2", "", "12"],
)  # fmt: skip
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        LengthDistribution.parse(spec)


def test_fixed_and_uniform_stay_in_bounds_and_cover_them() -> None:
    assert set(_draws("fixed:7", 50)) == {7}
    draws = _draws("uniform:3:9", 2000)
    assert min(draws) == 3 and max(draws) == 9
    assert set(draws) == set(range(3, 10))


def test_longtail_is_bounded_skewed_and_centred_on_its_median() -> None:
    draws = _draws("longtail:100:2000", 4000)
    assert min(draws) >= 1 and max(draws) <= 2000
    assert 85 <= percentile(draws, 50) <= 115
    assert percentile(draws, 99) > 5 * percentile(draws, 50)  # the long tail
    tight = _draws("longtail:100:120", 1000)
    assert max(tight) == 120 and min(tight) >= 1


def test_sampling_is_seeded() -> None:
    assert _draws("longtail:64:4096", 100, seed=3) == _draws("longtail:64:4096", 100, seed=3)
    assert _draws("longtail:64:4096", 100, seed=3) != _draws("longtail:64:4096", 100, seed=4)


def _synthetic(seed: int = 5, kind: str = MAIN) -> SyntheticWorkload:
    return SyntheticWorkload(
        LengthDistribution.parse("uniform:4:40"),
        LengthDistribution.parse("uniform:1:8"),
        vocab_low=100,
        vocab_high=110,
        seed=seed,
        kind=kind,
    )


def test_synthetic_shapes_are_in_range_and_seeded() -> None:
    workload = _synthetic()
    shapes = [workload.next_shape() for _ in range(200)]
    for shape in shapes:
        assert isinstance(shape.prompt, tuple) and 4 <= len(shape.prompt) <= 40
        assert shape.num_prompt_tokens == len(shape.prompt)
        assert all(100 <= token_id < 110 for token_id in shape.prompt)
        assert 1 <= shape.max_tokens <= 8 and shape.kind == MAIN
    assert {token_id for shape in shapes for token_id in shape.prompt} == set(range(100, 110))
    again = _synthetic()
    assert [again.next_shape() for _ in range(200)] == shapes
    other = _synthetic(seed=6)
    assert [other.next_shape() for _ in range(200)] != shapes
    assert _synthetic().max_context_tokens == 48


def test_long_prompt_stream_does_not_shift_the_main_draws() -> None:
    alone = _synthetic()
    expected = [alone.next_shape() for _ in range(20)]
    main, long = _synthetic(), _synthetic(kind=LONG)
    interleaved = []
    for _ in range(20):
        interleaved.append(main.next_shape())
        assert long.next_shape().kind == LONG
    assert interleaved == expected


SHAREGPT = [
    {"conversations": [{"from": "human", "value": "What is two plus two?"},
                       {"from": "gpt", "value": "Two plus two is four, of course."}]},
    {"conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "gpt", "value": "Hello."},
                       {"from": "human", "value": "Name a colour."},
                       {"from": "gpt", "value": "Blue."},
                       {"from": "human", "value": "Another?"}]},
    {"conversations": [{"from": "human", "value": "No answer here."}]},
    {"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]},
    {"conversations": [{"from": "human", "value": "   "}, {"from": "gpt", "value": "x"}]},
    {"conversations": "not a list"},
    {"id": "no conversations"},
    "not an object",
]  # fmt: skip


def test_sharegpt_takes_the_first_human_turn_and_its_gpt_answer() -> None:
    conversations, num_skipped = parse_sharegpt(SHAREGPT)
    assert num_skipped == 6
    first, second = conversations
    assert first.prompt == "What is two plus two?"
    assert first.num_prompt_tokens_estimate == estimate_tokens(first.prompt) == 7  # ceil(5 * 1.3)
    assert first.num_output_tokens_estimate == 10  # ceil(7 words * 1.3)
    assert second.prompt == "Name a colour." and second.num_output_tokens_estimate == 2


def test_sharegpt_file_errors_name_the_flag(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SHAREGPT))
    conversations, num_skipped = load_sharegpt(str(good))
    assert len(conversations) == 2 and num_skipped == 6
    for name, text in [("obj.json", '{"a": 1}'), ("bad.json", "[{"), ("none.json", "[1, 2]")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(InvalidArgument) as info:
            load_sharegpt(str(path))
        assert info.value.field == "--sharegpt"
    with pytest.raises(InvalidArgument):
        load_sharegpt(str(tmp_path / "missing.json"))


def test_sharegpt_workload_drops_what_does_not_fit_and_caps_replies() -> None:
    conversations, _ = parse_sharegpt(SHAREGPT)
    workload = ShareGPTWorkload(conversations, seed=1, max_context_tokens=8, max_output_tokens=3)
    assert [c.prompt for c in workload.conversations] == ["Name a colour."]
    assert workload.num_dropped == 1
    shape = workload.next_shape()
    assert shape.prompt == "Name a colour." and shape.max_tokens == 2
    assert shape.num_prompt_tokens is None  # text: the server's usage gives the count
    capped = ShareGPTWorkload(conversations, seed=1, max_context_tokens=100, max_output_tokens=3)
    assert max(capped.next_shape().max_tokens for _ in range(20)) == 3
    with pytest.raises(InvalidArgument):
        ShareGPTWorkload(conversations, seed=1, max_context_tokens=3, max_output_tokens=3)


def _take(iterator, count: int) -> list[float]:
    return [next(iterator) for _ in range(count)]


def test_poisson_arrivals_are_seeded_ordered_and_at_the_rate() -> None:
    times = _take(poisson_arrivals(4.0, random.Random(1)), 4001)
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert times[-1] / 4000 == pytest.approx(0.25, rel=0.05)  # mean gap 1 / rate
    assert times == _take(poisson_arrivals(4.0, random.Random(1)), 4001)
    assert _take(poisson_arrivals(float("inf"), random.Random(1)), 5) == [0.0] * 5
    with pytest.raises(ValueError):
        next(poisson_arrivals(0.0, random.Random(1)))


def test_periodic_arrivals() -> None:
    assert _take(periodic_arrivals(2.5, 1.0), 4) == [1.0, 3.5, 6.0, 8.5]
    with pytest.raises(ValueError):
        next(periodic_arrivals(0.0, 0.0))


def _parse(*flags: str):
    args = cli.build_parser().parse_args(["bench", "serve", *flags])
    return options_from_args(args, token=None)


def test_flags_build_options_and_round_trip_through_the_command_line() -> None:
    options = _parse(
        "--address", "h:1", "--rate", "2.5", "--prompt-len", "longtail:64:512",
        "--output-len", "uniform:8:16", "--mix", "--long-prompt-len", "300",
        "--duration", "30", "--seed", "9", "--slo-ttft", "0.5", "--slo-itl-p99", "0.1",
        "--out", "somewhere", "--no-progress",
    )  # fmt: skip
    assert options.rate_per_s == 2.5 and options.concurrency is None
    assert options.prompt_len.spec == "longtail:64:512"
    assert options.long_every_s == 10.0 and options.first_long_s == 10.0
    assert options.long_output.spec == "uniform:8:16"
    assert options.max_main_requests is None  # the duration alone bounds the run
    argv = options_to_argv(options)
    assert argv[:3] == ["pdserve", "bench", "serve"]
    assert _parse(*argv[3:]) == options


def test_flag_defaults_and_conflicts(capsys: pytest.CaptureFixture[str]) -> None:
    options = _parse("--concurrency", "3")
    assert options.prompt_len.spec == "uniform:32:256" and options.output_len.spec == "fixed:32"
    assert options.max_main_requests == 100 and not options.mix
    assert (options.vocab_low, options.vocab_high) == (1000, 20000)
    assert options.out_dir is not None and options.out_dir.startswith("bench-results/serve-")
    for flags in (["--rate", "1", "--concurrency", "2"], [], ["--rate", "0"],
                  ["--concurrency", "1", "--prompt-len", "fixed:0"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            _parse(*flags)
        assert exit_info.value.code == 2
    with pytest.raises(InvalidArgument):
        _parse("--concurrency", "1", "--sharegpt", "x.json", "--prompt-len", "fixed:3")
    with pytest.raises(InvalidArgument):
        _parse("--concurrency", "1", "--vocab-low", "50", "--vocab-high", "50")


def test_options_keep_the_token_out_of_reports() -> None:
    args = cli.build_parser().parse_args(["bench", "serve", "--concurrency", "1"])
    options = options_from_args(args, token="secret-token-value")
    assert options.token == "secret-token-value"
    assert "secret-token-value" not in repr(options)
    assert "secret-token-value" not in json.dumps(options.to_dict())
    assert "secret-token-value" not in " ".join(options_to_argv(options))
