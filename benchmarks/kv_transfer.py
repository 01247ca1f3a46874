"""KV transfer benchmark: each KV transport against raw loopback TCP and an in-memory copy, and
what the hand-off adds to time-to-first-token in a real service.

    python -m benchmarks.kv_transfer [--out bench-results/kv_transfer] [--sizes 128,1024,4096]
        [--repeats N] [--transports grpc,...] [--quick] [--with-service | --no-service]

Writes `<out>/kv_transfer.json` (every raw figure and the machine facts) and
`<out>/kv_transfer.png`, and prints a table. Network transports send to a receiver in a child
process (spawn); "inproc" stays in this process. See docs/benchmarks.md ("KV transfer").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import kvtransfer
from benchmarks.kv_transfer_buffers import LAYOUT, payload_bytes, random_payload
from benchmarks.kv_transfer_control import PeerError, PeerProcess
from benchmarks.kv_transfer_measure import (
    GrpcBytesBaseline,
    LocalRig,
    RemoteRig,
    Rig,
    TcpBaseline,
    measure_memcpy,
    measure_transport,
    summarize,
)
from benchmarks.kv_transfer_peer import run_peer
from benchmarks.kv_transfer_profile import profile_grpc_steps
from benchmarks.kv_transfer_report import failures, table_lines, write_chart, write_json
from pdserve.config import KVTransferConfig

# Transports that live in one process by design.
IN_PROCESS_TRANSPORTS = frozenset({"inproc"})
# Transports that cannot run without a GPU ("nccl" can: on a CPU it runs torch.distributed's
# gloo backend, and reports so in every TransferStats.transport).
GPU_TRANSPORTS = frozenset({"nixl", "cuda_ipc"})
SERVICE_PROMPT_TOKENS = 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results/kv_transfer"))
    parser.add_argument("--sizes", default="128,1024,4096", help="prompt sizes in tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per figure")
    parser.add_argument("--transports", default=",".join(kvtransfer.TRANSPORTS))
    parser.add_argument("--quick", action="store_true",
                        help="128 tokens, 1 repeat, no service part (the smoke test)")
    service = parser.add_mutually_exclusive_group()
    service.add_argument("--with-service", action="store_true", help="run the TTFT part in --quick")
    service.add_argument("--no-service", action="store_true", help="skip the TTFT part")
    parser.add_argument("--service-requests", type=int, default=5,
                        help="timed requests per service (after one warm-up)")
    parser.add_argument("--service-transports", default="grpc,auto",
                        help="kv_transfer.transport values to run the service part with")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.service_requests = "128", 1, 1
    try:
        args.sizes = [int(size) for size in args.sizes.split(",")]
        for size in args.sizes:
            payload_bytes(size)
    except ValueError as exc:
        parser.error(f"--sizes: {exc}")
    args.transports = [name for name in args.transports.split(",") if name]
    unknown = [name for name in args.transports if name not in kvtransfer.TRANSPORTS]
    if unknown:
        parser.error(f"--transports: unknown {unknown}, valid: {', '.join(kvtransfer.TRANSPORTS)}")
    if args.repeats < 1 or args.service_requests < 1:
        parser.error("--repeats and --service-requests must be >= 1")
    args.run_service = not args.no_service and (args.with_service or not args.quick)
    return args


def machine_facts() -> dict[str, Any]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in
                     ("torch", "grpcio", "protobuf", "numpy", "crc32c", "ray")},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "loadavg_start": list(os.getloadavg()),
        **_git_facts(),
    }


def _git_facts() -> dict[str, Any]:
    """The commit measured and whether the working tree differed from it."""
    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], capture_output=True, text=True,
                                  timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"git_commit": git("rev-parse", "HEAD").strip(),
            "git_changed_files": [line[3:] for line in changed]}


def open_rigs(
    peer: PeerProcess, names: list[str], config: KVTransferConfig, skipped: dict[str, str]
) -> dict[str, tuple[Rig, kvtransfer.KVSender]]:
    """A sender and a receiver per transport that can run here; the others go to `skipped`."""
    rigs: dict[str, tuple[Rig, kvtransfer.KVSender]] = {}
    for name in names:
        if name in GPU_TRANSPORTS and not os.path.exists("/dev/nvidia0"):
            skipped[name] = "needs a GPU"
            continue
        try:
            sender = kvtransfer.make_sender(name, config)
            rig: Rig = (LocalRig(name, config.chunk_bytes) if name in IN_PROCESS_TRANSPORTS
                        else RemoteRig(peer, name, config.chunk_bytes))
        except Exception as exc:  # any failure to set up a transport only skips it
            skipped[name] = f"cannot start: {type(exc).__name__}: {exc}"
            continue
        rigs[name] = (rig, sender)
    for name, reason in skipped.items():
        print(f"skipping transport {name}: {reason}", flush=True)
    return rigs


def measure_size(
    num_tokens: int, repeats: int, tcp: TcpBaseline, grpc_bytes: GrpcBytesBaseline,
    rigs: dict[str, tuple[Rig, kvtransfer.KVSender]],
) -> dict[str, Any]:
    payload = random_payload(num_tokens, seed=num_tokens)
    num_bytes = payload.nbytes
    baselines = {
        "raw_tcp": summarize(tcp.measure(payload, repeats), num_bytes),
        "memcpy": summarize(measure_memcpy(payload, repeats), num_bytes),
        "grpc_bytes": summarize(grpc_bytes.measure(payload, repeats), num_bytes),
    }
    transports: dict[str, dict[str, Any]] = {}
    for name, (rig, sender) in rigs.items():
        try:
            transports[name] = summarize(
                measure_transport(rig, sender, num_tokens, payload, repeats), num_bytes
            )
        except Exception as exc:  # one failing transport must not hide the others' figures
            transports[name] = {"error": f"{type(exc).__name__}: {exc}"}
    for figures in [*baselines.values(), *transports.values()]:
        if "gb_per_s" in figures:
            figures["vs_raw_tcp"] = figures["gb_per_s"] / baselines["raw_tcp"]["gb_per_s"]
            figures["vs_memcpy"] = figures["gb_per_s"] / baselines["memcpy"]["gb_per_s"]
    print(f"measured {num_tokens} tokens ({num_bytes / 1e6:.1f} MB)", flush=True)
    return {"num_tokens": num_tokens, "num_bytes": num_bytes, "baselines": baselines,
            "transports": transports}


def run_transfers(args: argparse.Namespace, results: dict[str, Any]) -> None:
    config = KVTransferConfig()
    results["params"]["chunk_bytes"] = config.chunk_bytes
    peer = PeerProcess(run_peer)
    rigs: dict[str, tuple[Rig, kvtransfer.KVSender]] = {}
    try:
        tcp, grpc_bytes = TcpBaseline(peer), GrpcBytesBaseline(peer)
        rigs = open_rigs(peer, args.transports, config, results["skipped_transports"])
        for num_tokens in args.sizes:
            size = measure_size(num_tokens, args.repeats, tcp, grpc_bytes, rigs)
            results["transfer"].append(size)
        tcp.close()
        grpc_bytes.close()
    finally:
        for rig, sender in rigs.values():
            sender.close()
            # A dead peer already failed the run: do not hide that error behind this one.
            with contextlib.suppress(PeerError):
                rig.close()
        peer.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "params": {"sizes": args.sizes, "repeats": args.repeats, "transports": args.transports,
                   "layout": {"num_layers": LAYOUT.num_layers, "num_kv_heads": LAYOUT.num_kv_heads,
                              "head_dim": LAYOUT.head_dim, "dtype": LAYOUT.dtype,
                              "bytes_per_token": LAYOUT.kv_bytes(1)}},
        "transfer": [], "skipped_transports": {}, "grpc_profile": [], "service": None,
    }
    run_transfers(args, results)
    for num_tokens in args.sizes:
        results["grpc_profile"].append(profile_grpc_steps(
            num_tokens, random_payload(num_tokens, seed=num_tokens),
            results["params"]["chunk_bytes"], args.repeats,
        ))
    if args.run_service:
        from benchmarks.kv_transfer_service import measure_service

        results["machine"]["loadavg_before_service"] = list(os.getloadavg())
        results["service"] = measure_service(
            args.service_transports.split(","), SERVICE_PROMPT_TOKENS, args.service_requests
        )
    else:
        results["service"] = "skipped (--quick without --with-service, or --no-service)"
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(results, args.out / "kv_transfer.json")
    write_chart(results, args.out / "kv_transfer.png")
    print("\n".join(table_lines(results)))
    print(f"wrote {args.out / 'kv_transfer.json'} and {args.out / 'kv_transfer.png'}")
    return 1 if failures(results) else 0


if __name__ == "__main__":
    sys.exit(main())
