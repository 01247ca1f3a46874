"""`python -m pdserve.k8s_manifest`:

- `pools-patch CONFIG` prints an overlay's pools-patch.yaml;
- `check CONFIG [MANIFESTS]` checks rendered manifests (a YAML stream, e.g. from
  `kubectl kustomize k8s/overlays/cpu`; `-` or nothing = stdin) against the config;
- `wait-for-pools CONFIG [--ray-address A] [--timeout S]` blocks until the Ray cluster can
  host both pools (run in the router's pod before `pdserve serve`).

Exit codes: 0 in step / ready, 1 disagreements or timed out, 2 a bad config or file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from pdserve.config import PdserveConfig, load_config
from pdserve.errors import ConfigError, Unavailable
from pdserve.k8s_manifest import check_manifests, pools_patch_yaml


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "pools-patch":
            sys.stdout.write(pools_patch_yaml(config, args.config))
            return 0
        if args.command == "wait-for-pools":
            return _wait(config, args)
        problems = check_manifests(config, _read_objects(args.manifests))
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"out of step: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pdserve.k8s_manifest")
    commands = parser.add_subparsers(dest="command", required=True)
    patch = commands.add_parser("pools-patch", help="print the worker groups' JSON 6902 patch")
    patch.add_argument("config")
    check = commands.add_parser("check", help="check rendered manifests against a config")
    check.add_argument("config")
    check.add_argument("manifests", nargs="?", default="-")
    wait = commands.add_parser("wait-for-pools", help="wait until Ray can host both pools")
    wait.add_argument("config")
    wait.add_argument("--ray-address", default=None, help="default: the config's ray.address")
    wait.add_argument(
        "--timeout", type=float, default=None, help="seconds; default timeouts.replica_start_s"
    )
    return parser


def _wait(config: PdserveConfig, args: argparse.Namespace) -> int:
    from pdserve.k8s_manifest.wait import ray_nodes, wait_for_pools

    timeout_s = args.timeout if args.timeout is not None else config.timeouts.replica_start_s
    report = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        with ray_nodes(config, args.ray_address) as list_nodes:
            wait_for_pools(config, list_nodes, timeout_s, report=report)
    except Unavailable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    report("pdserve: the Ray cluster can host both pools")
    return 0


def _read_objects(path: str) -> list[dict[str, Any]]:
    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


if __name__ == "__main__":
    sys.exit(main())
