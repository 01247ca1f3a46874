"""`pdserve scale`: resize the pools of a running service through `Admin.Scale`.

`pdserve.cli` builds the subcommand (address and token flags like `generate` and `info`) and
calls `add_scale_arguments`, `scale_targets`, `read_token_file` and `run_scale` from here;
`pdserve info` shows pool sizes with `pool_of` and `format_pool_sizes`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from pdserve.client import GenerationClient
from pdserve.config import load_config
from pdserve.errors import Unavailable
from pdserve.v1 import pdserve_pb2

POOL_FLAGS = ("prefill", "decode", "colocated")
# A token file holds one token (and maybe comments); anything bigger is a wrong path.
MAX_TOKEN_FILE_BYTES = 64 * 1024
WAIT_POLL_S = 0.5


def add_scale_arguments(parser: argparse.ArgumentParser, count: Callable[[str], int]) -> None:
    """`count` parses a replica count (the CLI's bounded int type)."""
    for pool in POOL_FLAGS:
        parser.add_argument(
            f"--{pool}", type=count, default=None, metavar="N",
            help=f"new number of {pool} replicas",
        )
    parser.add_argument(
        "--config",
        help="YAML config: apply its pools' `replicas` counts (nothing else); the flags above "
        "override them",
    )
    parser.add_argument(
        "--token-file", default=None, metavar="FILE",
        help="read the API bearer token from FILE (first line that is not blank or a comment)",
    )
    parser.add_argument(
        "--wait", action="store_true",
        help="return once every scaled pool has exactly its target of READY replicas",
    )
    parser.add_argument(
        "--wait-timeout", type=float, default=600.0, help="seconds --wait may take (default 600)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call")


def scale_targets(args: argparse.Namespace) -> dict[str, int]:
    """{pool: replicas} from `--config` then the pool flags. Raises argparse.ArgumentTypeError
    when nothing is asked; `load_config` raises ConfigError for a bad file."""
    targets: dict[str, int] = {}
    if args.config is not None:
        config = load_config(args.config)
        if config.mode == "colocated":
            targets["colocated"] = config.colocated.replicas
        else:
            targets.update(prefill=config.prefill.replicas, decode=config.decode.replicas)
    for pool in POOL_FLAGS:
        value = getattr(args, pool)
        if value is not None:
            targets[pool] = value
    if not targets:
        raise argparse.ArgumentTypeError(
            "name a pool size: --prefill N, --decode N, --colocated N or --config FILE"
        )
    return targets


def read_token_file(path: str) -> str:
    """The first line of `path` that is neither blank nor a `#` comment. Raises OSError when
    the file cannot be read, is too big or holds no token."""
    with open(path, "rb") as file:
        data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise OSError(f"{path}: larger than {MAX_TOKEN_FILE_BYTES} bytes")
    for line in data.decode("utf-8", errors="replace").splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            return token
    raise OSError(f"{path}: no token in the file")


def run_scale(
    client: GenerationClient, targets: dict[str, int], wait: bool, wait_timeout_s: float,
    out: Callable[[str], None],
) -> None:
    """Sends the new sizes, prints each pool's change, and with `wait` polls Info until the
    pools settled. Raises `grpc.RpcError` from the calls; Unavailable when the wait times out."""
    response = client.scale(targets)
    for pool in sorted(response.target_replicas):
        before = response.previous_target_replicas.get(pool, 0)
        after = response.target_replicas[pool]
        out(f"{pool:<11} {before} -> {after} replicas" + ("" if before != after else " (same)"))
    if wait:
        _wait_until_settled(client, dict(response.target_replicas), wait_timeout_s, out)


def pool_of(info: pdserve_pb2.InfoResponse, pool: str) -> pdserve_pb2.PoolInfo | None:
    """Info's PoolInfo for a pool role (its field name), None when the service has no such
    field or does not run that pool."""
    if pool not in info.DESCRIPTOR.fields_by_name or not info.HasField(pool):
        return None
    pool_info: pdserve_pb2.PoolInfo = getattr(info, pool)
    return pool_info


def format_pool_sizes(pool: pdserve_pb2.PoolInfo) -> str:
    """The scaling part of a pool's `pdserve info` line: its target when it differs from the
    configured size, its autoscaler's bounds when on; "" when neither."""
    parts = []
    if pool.target_replicas and pool.target_replicas != pool.configured_replicas:
        parts.append(f"target {pool.target_replicas}")
    if pool.autoscale:
        parts.append(f"autoscale {pool.min_replicas}..{pool.max_replicas}")
    return f" ({', '.join(parts)})" if parts else ""


def settled(pool: pdserve_pb2.PoolInfo) -> bool:
    """The pool has exactly its target of replicas, all READY (no start or drain pending)."""
    ready = [r for r in pool.replicas if r.state == pdserve_pb2.REPLICA_STATE_READY]
    return len(pool.replicas) == len(ready) == pool.target_replicas


def _wait_until_settled(
    client: GenerationClient, targets: dict[str, int], timeout_s: float,
    out: Callable[[str], None],
) -> None:
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    while True:
        info = client.info()
        pools = {name: pool_of(info, name) for name in targets}
        pending = [name for name, pool in pools.items() if pool is not None and not settled(pool)]
        if not pending:
            out(f"pools settled after {time.monotonic() - started:.0f} s")
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"pools {pending} not settled after {timeout_s:.0f} s")
        time.sleep(WAIT_POLL_S)  # the polling period of a bounded wait
