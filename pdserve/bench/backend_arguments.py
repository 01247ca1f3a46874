"""The flags that choose what `pdserve bench serve` drives: `--backend`, `--base-url`,
`--model`, `--api-key`, `--no-ignore-eos-param` and `--tokenizer`.

`grpc` (the default) uses the CLI's `--address`; the openai-* backends need `--base-url` and
ignore `--address`. Contradictions (`--base-url` with grpc, chat over token ids without
`--tokenizer`, ...) are refused by BenchOptions with InvalidArgument naming the flag.
"""

from __future__ import annotations

import argparse
from typing import Any

from pdserve.bench.options import BACKENDS, GRPC, BenchOptions


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the backend group to `parser`."""
    group = parser.add_argument_group(
        "backend: pdserve's router over gRPC, or any OpenAI-compatible HTTP server"
    )
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default=GRPC,
        help="grpc: the router at --address (default); openai-completions: POST "
        "{base}/completions with token-id prompts; openai-chat: POST {base}/chat/completions",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        help="OpenAI API root of the openai-* backends, e.g. http://127.0.0.1:8000/v1",
    )
    group.add_argument(
        "--model", metavar="NAME", help="model to ask for (default: the first of GET {base}/models)"
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="bearer token of the openai-* backends (default: --token / $PDSERVE_TOKEN)",
    )
    group.add_argument(
        "--no-ignore-eos-param",
        dest="send_ignore_eos",
        action="store_false",
        help="do not send ignore_eos (for servers that reject unknown fields; replies may "
        "then stop before max_tokens)",
    )
    group.add_argument(
        "--no-keep-alive",
        dest="keep_alive",
        action="store_false",
        help="open a connection per request (for servers that close a connection after each "
        "streamed reply although they announce keep-alive, as llama.cpp's llama-server does)",
    )
    group.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="openai-chat: tokenizer.json (or a Hugging Face folder with one) to decode the "
        "synthetic token-id prompts into the user message",
    )


def backend_fields(args: argparse.Namespace) -> dict[str, Any]:
    """BenchOptions fields from the parsed backend flags (the address only for grpc)."""
    return {
        "address": args.address if args.backend == GRPC else "",
        "backend": args.backend,
        "base_url": args.base_url,
        "model": args.model,
        "api_key": args.api_key,
        "send_ignore_eos": args.send_ignore_eos,
        "tokenizer": args.tokenizer,
        "keep_alive": args.keep_alive,
    }


def backend_argv(options: BenchOptions) -> list[str]:
    """The backend part of the canonical command line, API key left out."""
    if options.backend == GRPC:
        return ["--address", options.address]
    assert options.base_url is not None, "BenchOptions checks --base-url"
    argv = ["--backend", options.backend, "--base-url", options.base_url]
    for flag, value in (("--model", options.model), ("--tokenizer", options.tokenizer)):
        if value is not None:
            argv += [flag, value]
    if not options.send_ignore_eos:
        argv.append("--no-ignore-eos-param")
    if not options.keep_alive:
        argv.append("--no-keep-alive")
    return argv
