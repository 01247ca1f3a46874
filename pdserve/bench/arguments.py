"""The flags of `pdserve bench serve` and their translation to and from BenchOptions.

`pdserve.cli` creates the subcommand, adds its shared `--address`/`--token`/`--tls-ca` flags,
then calls `add_serve_arguments`; its handler calls `options_from_args`. `options_to_argv` gives
the canonical command line of a run for results.json (without the token or API key). The
backend flags live in `backend_arguments`.
"""

from __future__ import annotations

import argparse
import datetime
import math
from collections.abc import Callable

from pdserve.bench.backend_arguments import add_backend_arguments, backend_argv, backend_fields
from pdserve.bench.lengths import LengthDistribution
from pdserve.bench.options import BenchOptions
from pdserve.errors import InvalidArgument

DEFAULT_OUT_ROOT = "bench-results"
DEFAULT_LONG_EVERY_S = 10.0  # `--mix` without `--long-every`


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the backend, arrival, workload, bound, SLO and output flags to `parser`."""
    add_backend_arguments(parser)
    arrivals = parser.add_mutually_exclusive_group(required=True)
    arrivals.add_argument(
        "--rate",
        type=_number(0, exclusive=True, infinite=True),
        metavar="R",
        help="open loop: Poisson arrivals at R requests/s ('inf': all at once)",
    )
    arrivals.add_argument(
        "--concurrency",
        type=_integer(1),
        metavar="C",
        help="closed loop: keep C requests in flight",
    )

    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--prompt-len",
        type=_lengths,
        metavar="SPEC",
        help="fixed:N | uniform:A:B | longtail:MEDIAN:MAX (default uniform:32:256)",
    )
    workload.add_argument(
        "--output-len",
        type=_lengths,
        metavar="SPEC",
        help="max_tokens of each request, same forms (default fixed:32)",
    )
    workload.add_argument(
        "--sharegpt",
        metavar="FILE",
        help="ShareGPT JSON: real prompts as text, reply length as max_tokens",
    )
    workload.add_argument(
        "--sharegpt-max-output",
        type=_integer(1),
        default=1024,
        metavar="N",
        help="cap on a ShareGPT reply's max_tokens (default 1024)",
    )
    workload.add_argument(
        "--vocab-low",
        type=_integer(0),
        default=1000,
        help="synthetic prompt ids are drawn from [low, high) (default 1000)",
    )
    workload.add_argument("--vocab-high", type=_integer(1), default=20000, help="(default 20000)")

    mix = parser.add_argument_group("mix: periodic long prompts on top of the main arrivals")
    mix.add_argument(
        "--mix", action="store_true", help="add one long-prompt request every --long-every seconds"
    )
    mix.add_argument(
        "--long-every",
        type=_number(0, exclusive=True),
        metavar="S",
        help="seconds between long prompts (implies --mix; default 10)",
    )
    mix.add_argument(
        "--long-start",
        type=_number(0),
        metavar="S",
        help="when the first long prompt goes (default: one period in)",
    )
    mix.add_argument(
        "--long-prompt-len",
        type=_integer(1),
        default=1024,
        metavar="N",
        help="tokens of each long prompt (default 1024)",
    )
    mix.add_argument(
        "--long-output-len",
        type=_lengths,
        metavar="SPEC",
        help="max_tokens of the long requests (default: as --output-len)",
    )

    bounds = parser.add_argument_group("bounds")
    bounds.add_argument(
        "--num-requests",
        type=_integer(1),
        metavar="N",
        help="main requests to send (default 100 when --duration is not given)",
    )
    bounds.add_argument(
        "--duration",
        type=_number(0, exclusive=True),
        metavar="S",
        help="stop sending after S seconds (whichever bound comes first)",
    )
    bounds.add_argument("--seed", type=_integer(0), default=0, help="seed of every draw")
    bounds.add_argument(
        "--timeout",
        type=_number(0, exclusive=True),
        metavar="S",
        help="deadline of each request (default: the server's)",
    )

    report = parser.add_argument_group("report")
    report.add_argument(
        "--slo-ttft",
        type=_number(0, exclusive=True),
        metavar="S",
        help="goodput counts requests with TTFT <= S",
    )
    report.add_argument(
        "--slo-itl-p99",
        type=_number(0, exclusive=True),
        metavar="S",
        help="goodput counts requests whose own p99 inter-token gap <= S",
    )
    report.add_argument(
        "--out",
        metavar="DIR",
        help=f"results.json and charts (default {DEFAULT_OUT_ROOT}/serve-<time>)",
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace, token: str | None) -> BenchOptions:
    """BenchOptions from parsed flags; `token` is resolved by the CLI (flag or environment).
    Raises InvalidArgument for flags that contradict each other."""
    if args.sharegpt is not None and (args.prompt_len or args.output_len):
        raise InvalidArgument(
            "--sharegpt", "takes the lengths from the file; drop --prompt-len and --output-len"
        )
    given_lengths = {
        name: value
        for name, value in (("prompt_len", args.prompt_len), ("output_len", args.output_len))
        if value is not None
    }
    long_every = (
        args.long_every
        if args.long_every is not None
        else (DEFAULT_LONG_EVERY_S if args.mix else None)
    )
    return BenchOptions(
        **backend_fields(args),
        rate_per_s=args.rate,
        concurrency=args.concurrency,
        **given_lengths,
        sharegpt_file=args.sharegpt,
        sharegpt_max_output_tokens=args.sharegpt_max_output,
        vocab_low=args.vocab_low,
        vocab_high=args.vocab_high,
        long_every_s=long_every,
        long_start_s=args.long_start,
        long_prompt_len=args.long_prompt_len,
        long_output_len=args.long_output_len,
        num_requests=args.num_requests,
        duration_s=args.duration,
        seed=args.seed,
        slo_ttft_s=args.slo_ttft,
        slo_itl_p99_s=args.slo_itl_p99,
        timeout_s=args.timeout,
        out_dir=args.out if args.out is not None else _default_out_dir(),
        progress=not args.no_progress,
        token=token,
        tls_ca_file=args.tls_ca,
    )


def options_to_argv(options: BenchOptions) -> list[str]:
    """The canonical `pdserve bench serve ...` command line of `options`, token left out."""
    argv = ["pdserve", "bench", "serve", *backend_argv(options)]
    if options.rate_per_s is not None:
        argv += ["--rate", _format_number(options.rate_per_s)]
    else:
        argv += ["--concurrency", str(options.concurrency)]
    if options.sharegpt_file is not None:
        argv += [
            "--sharegpt",
            options.sharegpt_file,
            "--sharegpt-max-output",
            str(options.sharegpt_max_output_tokens),
        ]
    else:
        argv += [
            "--prompt-len",
            options.prompt_len.spec,
            "--output-len",
            options.output_len.spec,
            "--vocab-low",
            str(options.vocab_low),
            "--vocab-high",
            str(options.vocab_high),
        ]
    if options.long_every_s is not None:
        argv += [
            "--long-every",
            _format_number(options.long_every_s),
            "--long-prompt-len",
            str(options.long_prompt_len),
        ]
    optional: tuple[tuple[str, str | float | LengthDistribution | None], ...] = (
        ("--long-start", options.long_start_s),
        ("--long-output-len", options.long_output_len),
        ("--num-requests", options.num_requests),
        ("--duration", options.duration_s),
        ("--timeout", options.timeout_s),
        ("--slo-ttft", options.slo_ttft_s),
        ("--slo-itl-p99", options.slo_itl_p99_s),
        ("--out", options.out_dir),
        ("--tls-ca", options.tls_ca_file),
    )
    argv += ["--seed", str(options.seed)]
    for flag, value in optional:
        if value is not None:
            argv += [flag, _format_value(value)]
    if not options.progress:
        argv.append("--no-progress")
    return argv


def _default_out_dir() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{DEFAULT_OUT_ROOT}/serve-{stamp}"


def _format_number(value: float) -> str:
    return "inf" if math.isinf(value) else repr(value)


def _format_value(value: str | float | LengthDistribution) -> str:
    if isinstance(value, LengthDistribution):
        return value.spec
    return value if isinstance(value, str) else _format_number(value)


def _lengths(text: str) -> LengthDistribution:
    try:
        return LengthDistribution.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    parse.__name__ = "integer"  # argparse shows this name in "invalid integer value"
    return parse


def _number(low: float, exclusive: bool = False, infinite: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if math.isnan(value) or value < low or (exclusive and value == low):
            relation = ">" if exclusive else ">="
            raise argparse.ArgumentTypeError(f"{value} is not {relation} {low}")
        if math.isinf(value) and not infinite:
            raise argparse.ArgumentTypeError("must be finite")
        return value

    parse.__name__ = "number"
    return parse
