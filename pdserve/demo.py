"""`python -m pdserve.demo --config configs/local.yaml`: start pdserve, stream a few answers.

Starts the service in-process, sends each prompt below through the public gRPC API, prints
the answer as it streams and then how it was served; stops the service. Exit code 0 only if
every request finished normally.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pdserve.cli import resolve_ray_address
from pdserve.client import GenerationClient, GenerationResult, collect
from pdserve.config import load_config
from pdserve.errors import ConfigError, PdserveError
from pdserve.v1 import pdserve_pb2

MAX_TOKENS = 48
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DemoPrompt:
    # What the terminal shows.
    label: str
    # What is sent: raw text to continue, or a conversation the router renders with the
    # model's own chat template.
    prompt: str | tuple[dict[str, str], ...]
    stop: tuple[str, ...] = ()


def _chat(question: str) -> DemoPrompt:
    return DemoPrompt(label=f"user: {question}", prompt=({"role": "user", "content": question},))


PROMPTS = (
    DemoPrompt(
        label="The capital of France is", prompt="The capital of France is", stop=("\n",)
    ),
    _chat("Give me three tips for staying healthy."),
    _chat("Write a haiku about the ocean."),
    DemoPrompt(
        label="Once upon a time, in a small village,",
        prompt="Once upon a time, in a small village,",
    ),
)


class DemoFailure(Exception):
    """A request ended without the final message a successful stream must carry."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.demo", description=__doc__)
    parser.add_argument("--config", default="configs/local.yaml", help="YAML config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from pdserve.serve import Service  # imports Ray

    service = Service(config, ray_address=resolve_ray_address(None, config.ray.address))
    try:
        service.start()
        print(f"pdserve is listening on {service.address} (gRPC)", flush=True)
        if service.http_base_url:
            print(f"OpenAI-compatible API on {service.http_base_url}", flush=True)
        print(flush=True)
        with GenerationClient(service.address, timeout_s=REQUEST_TIMEOUT_S) as client:
            for number, prompt in enumerate(PROMPTS, start=1):
                print(f"[{number}/{len(PROMPTS)}] {prompt.label}")
                _show(_ask(client, prompt))
    except grpc.RpcError as exc:
        print(f"\ndemo failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ConfigError, PdserveError, DemoFailure) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        service.stop()
    print("all requests served; service stopped")
    return 0


def _ask(client: GenerationClient, prompt: DemoPrompt) -> GenerationResult:
    content = prompt.prompt if isinstance(prompt.prompt, str) else list(prompt.prompt)
    stream = client.generate(content, max_tokens=MAX_TOKENS, stop=prompt.stop)
    print("  > ", end="", flush=True)
    result = collect(stream, on_text=_print_live)
    print(flush=True)
    if result.final is None:
        raise DemoFailure(f"the stream for {prompt.label!r} ended without a final message")
    return result


def _print_live(text: str) -> None:
    # Indent continuation lines so answers stay visually under their prompt.
    print(text.replace("\n", "\n    "), end="", flush=True)


def _show(result: GenerationResult) -> None:
    final = result.final
    assert final is not None, "checked by _ask"
    reason = pdserve_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_")
    served = final.served_by
    print(
        f"  [{final.usage.completion_tokens} tokens, finish {reason.lower()}, "
        f"TTFT {result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s; "
        f"{served.mode}: {served.prefill_replica} -> {served.decode_replica} "
        f"over {served.kv_transport}, {served.kv_bytes / 1024:.0f} KiB of KV]\n"
    )


if __name__ == "__main__":
    sys.exit(main())
