"""The `pdserve` command: `serve` runs the service, `generate`, `chat` (see `pdserve.chat_cli`)
and `info` talk to it, `scale` resizes its pools (see `pdserve.scale_cli`), `bench serve`
measures it under load. The client flags they share live in `pdserve.cli_flags`.

Exit codes: 0 success, 1 a failed call or service error, 2 a bad config or bad arguments.
`RAY_ADDRESS` and `PDSERVE_TOKEN` are read here, and only here, to pass them on explicitly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

import grpc

from pdserve.bench import add_serve_arguments, options_from_args, run_serve_bench
from pdserve.chat_cli import Conversation, add_chat_arguments, run_chat
from pdserve.cli_flags import (
    DEFAULT_ADDRESS,
    INT32_MAX,
    TOKEN_ENV,
    add_address,
    add_client_security,
    add_generation_arguments,
    int_in,
    sampling_kwargs,
)
from pdserve.client import GenerationClient, Prompt, collect
from pdserve.config import load_config
from pdserve.errors import ConfigError, PdserveError
from pdserve.scale_cli import (
    POOL_FLAGS,
    add_scale_arguments,
    format_pool_sizes,
    pool_of,
    read_token_file,
    run_scale,
    scale_targets,
)
from pdserve.v1 import pdserve_pb2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except PdserveError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated prefill/decode LLM serving on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service in the foreground")
    serve.add_argument("--config", required=True, help="YAML config (see configs/local.yaml)")
    serve.add_argument(
        "--ray-address",
        help="Ray cluster to join; default: $RAY_ADDRESS, else the config's ray.address",
    )
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="stream a completion of one prompt")
    add_address(generate)
    add_client_security(generate)
    generate.add_argument("prompt", help="prompt text")
    add_generation_arguments(generate)
    generate.add_argument(
        "--chat", action="store_true",
        help="send the prompt as a user message, rendered with the model's chat template",
    )
    generate.add_argument(
        "--system", default=None, metavar="TEXT",
        help="system message before the prompt (implies --chat)",
    )
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="chat interactively, keeping the conversation")
    add_address(chat)
    add_client_security(chat)
    add_generation_arguments(chat)
    add_chat_arguments(chat)
    chat.set_defaults(run=_chat)

    info = commands.add_parser("info", help="describe a running service")
    add_address(info)
    add_client_security(info)
    info.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    info.set_defaults(run=_info)

    scale = commands.add_parser(
        "scale", help="resize the pools of a running service (drains removed replicas)"
    )
    scale.add_argument(
        "--address", "--target", dest="address", default=DEFAULT_ADDRESS,
        help=f"router host:port (default {DEFAULT_ADDRESS})",
    )
    add_client_security(scale)
    add_scale_arguments(scale, int_in(1, INT32_MAX))
    scale.set_defaults(run=_scale)

    bench = commands.add_parser("bench", help="measure a running service")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    bench_serve = benchmarks.add_parser(
        "serve", help="load generator: TTFT, inter-token latency, throughput, goodput"
    )
    add_address(bench_serve)
    add_client_security(bench_serve)
    add_serve_arguments(bench_serve)
    bench_serve.set_defaults(run=_bench_serve)
    return parser


def resolve_token(flag: str | None) -> str | None:
    """`--token`, else `$PDSERVE_TOKEN`; None (send no token) when neither is set or empty."""
    return flag or os.environ.get(TOKEN_ENV) or None


def resolve_ray_address(flag: str | None, config_address: str | None) -> str | None:
    """`--ray-address`, else `$RAY_ADDRESS`, else the config's `ray.address`."""
    return flag or os.environ.get("RAY_ADDRESS") or config_address


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    ray_address = resolve_ray_address(args.ray_address, config.ray.address)
    from pdserve.serve import Service  # imports Ray; only `serve` needs it

    service = Service(config, ray_address=ray_address)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        service.start()
        # ray.init() (inside start) replaces the SIGTERM handler with one that exits at once.
        signal.signal(signal.SIGTERM, _interrupt)
        print(f"pdserve: listening on {service.address}", flush=True)
        if service.http_base_url:
            print(f"pdserve: OpenAI-compatible API on {service.http_base_url}", flush=True)
        service.wait()
    except KeyboardInterrupt:
        print("pdserve: shutting down...", file=sys.stderr, flush=True)
    finally:
        service.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM takes the same clean path as Ctrl-C.
    raise KeyboardInterrupt


def _generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stream = client.generate(_generate_prompt(args), **sampling_kwargs(args))
        try:
            result = collect(stream, on_text=_write_out)
        finally:
            sys.stdout.write("\n")
            sys.stdout.flush()
    print(result.summary(), file=sys.stderr)
    return 0


def _generate_prompt(args: argparse.Namespace) -> Prompt:
    if not args.chat and args.system is None:
        return args.prompt
    return Conversation(args.system).ask(args.prompt)


def _chat(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return run_chat(client, sampling_kwargs(args), args.system, args.show_stats)


def _info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(format_info(client.info()))
    return 0


def _scale(args: argparse.Namespace) -> int:
    try:
        targets = scale_targets(args)
        token = read_token_file(args.token_file) if args.token_file else resolve_token(args.token)
    except (argparse.ArgumentTypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = GenerationClient(
        args.address, timeout_s=args.timeout, token=token, tls_ca_file=args.tls_ca
    )
    with client:
        run_scale(client, targets, args.wait, args.wait_timeout, print)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    results = run_serve_bench(options_from_args(args, token=resolve_token(args.token)))
    if results["summary"]["num_ok"] == 0:
        print("error: no request finished OK", file=sys.stderr)
        return 1
    return 0


def _client(args: argparse.Namespace) -> GenerationClient:
    return GenerationClient(
        args.address,
        timeout_s=args.timeout,
        token=resolve_token(args.token),
        tls_ca_file=args.tls_ca,
    )


def format_info(info: pdserve_pb2.InfoResponse) -> str:
    """Human-readable form of an Info response."""
    lines = [
        f"model       {info.model} ({info.dtype})",
        f"version     {info.version}",
        f"mode        {info.mode}, KV transport {info.kv_transport}",
        f"limits      KV block {info.kv_block_size} tokens, "
        f"max context {info.max_context_tokens} tokens",
    ]
    for name in POOL_FLAGS:
        pool = pool_of(info, name)
        if pool is None:
            continue
        lines.append(f"{name:<11} {len(pool.replicas)}/{pool.configured_replicas} replicas"
                     f"{format_pool_sizes(pool)}")
        lines.extend(f"  {_format_replica(replica)}" for replica in pool.replicas)
    return "\n".join(lines)


def _format_replica(replica: pdserve_pb2.ReplicaInfo) -> str:
    state = pdserve_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_")
    return (
        f"{replica.replica_id:<12} {state:<12} active={replica.num_active_requests} "
        f"free_blocks={replica.num_free_blocks}/{replica.num_total_blocks} "
        f"node={replica.node_id[:12]} kernels={replica.kernels or '?'}"
    )


def _write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
