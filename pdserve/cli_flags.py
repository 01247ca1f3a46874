"""Flags shared by the `pdserve` subcommands that talk to a running service.

`pdserve.cli` builds `generate`, `chat`, `info`, `scale` and `bench serve` from these helpers, so
a flag means the same thing in each. `sampling_kwargs` turns the generation flags back into
`GenerationClient.generate` keyword arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "PDSERVE_TOKEN"
INT32_MAX = 2**31 - 1


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"router host:port (default {DEFAULT_ADDRESS})"
    )


def add_client_security(parser: argparse.ArgumentParser) -> None:
    """Adds `--token` (resolved with `$PDSERVE_TOKEN` by the caller) and `--tls-ca`."""
    parser.add_argument(
        "--token",
        default=None,
        help=f"API bearer token (default ${TOKEN_ENV}; prefer the variable: a flag shows in "
        "the process list)",
    )
    parser.add_argument(
        "--tls-ca",
        type=readable_file,
        default=None,
        metavar="FILE",
        help="PEM CA certificate that signed the router's certificate; connects with TLS",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the sampling and stopping flags read by `sampling_kwargs`, and `--timeout`."""
    parser.add_argument("--max-tokens", type=int_in(1, INT32_MAX), default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.0, help="0 = no nucleus filter")
    parser.add_argument("--top-k", type=int_in(0, INT32_MAX), default=0, help="0 = off")
    parser.add_argument("--seed", type=int_in(0, 2**64 - 1), default=None)
    parser.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)"
    )
    parser.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        action="append",
        type=int_in(0, INT32_MAX),
        default=[],
        metavar="ID",
        help="stop token id (repeatable)",
    )
    parser.add_argument("--ignore-eos", action="store_true", help="generate past EOS")
    parser.add_argument(
        "--timeout", type=float, default=None, help="deadline of each call in seconds"
    )


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `GenerationClient.generate` keyword arguments given by `add_generation_arguments`'
    flags."""
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "stop_token_ids": tuple(args.stop_token_ids),
        "ignore_eos": args.ignore_eos,
    }


def readable_file(path: str) -> str:
    """argparse type: `path` itself, once it opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an int in [low, high]."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    parse.__name__ = "integer"  # argparse shows this name in "invalid integer value"
    return parse
