"""Peers benchmark: pdserve against llama.cpp's `llama-server` and `transformers serve`, on the
same weights, on this machine, measured by one client (`pdserve bench serve`).

    python -m benchmarks.peers [--servers pdserve,llama.cpp,transformers] [--dtypes float32]
        [--concurrency 1,8,32] [--requests 8,32,64] [--threads 2] [--output-len 64]
        [--prompt-len uniform:100:300] [--out bench-results/peers.json] [--quick]

Life cycle: the embedded model's HF folder is resolved (pdserve serves it as is); for
llama.cpp, `llama-server` is built once and the folder converted to a GGUF of each dtype
(cached, see `benchmarks.peers_llama`). Then for each server x dtype, one server at a time is
started, polled until ready, warmed up, driven at each concurrency level (closed loop, chat
prompts of random token ids decoded with the model's tokenizer, fixed max_tokens with
`ignore_eos`; each level its own seed so no level reuses another's prompts from a prefix
cache), and stopped before the next starts. llama.cpp's slot count follows the concurrency,
so it is restarted per level; the others serve all levels from one start.

Writes the summary JSON after every run (so an interrupted run keeps what it measured), each
run's raw results.json and server log in `<out stem>-runs/`, a PNG beside the JSON, and a
markdown table on stdout.

Needs, beyond pdserve: cmake and a C++ compiler (llama.cpp), `sentencepiece` (imported by the
GGUF converter), `fastapi` and `uvicorn` (`transformers serve`), matplotlib for the chart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from benchmarks import peers_report as report
from benchmarks.peers_llama import DEFAULT_VERSION, LlamaCache, ensure_gguf, ensure_server
from benchmarks.peers_servers import (
    RunningServer,
    ServerError,
    ServerSpec,
    eos_free_model_dir,
    free_port,
    llama_spec,
    pdserve_config,
    pdserve_spec,
    transformers_spec,
)

# pdserve: its default disaggregated config; pdserve-colocated: one replica with every thread.
SERVERS = ("pdserve", "pdserve-colocated", "llama.cpp", "transformers")
# int8: pdserve `model.quantization: int8` (weight-only, bf16 activations) vs llama.cpp Q8_0;
# w8a8: pdserve `model.quantization: w8a8` (int8 activations too, as Q8_0's) vs Q8_0.
QUANTIZED = ("int8", "w8a8")
DTYPES = ("float32", "bfloat16", *QUANTIZED)
BIN = Path(sys.executable).parent


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--servers", default=",".join(SERVERS), help="comma-separated")
    add("--dtypes", default="float32", help="float32,bfloat16")
    add("--concurrency", default="1,8,32", help="closed-loop levels")
    add("--requests", default="8,32,64", help="per level: one number for all, or one per level")
    add("--threads", type=int, default=2, help="CPU threads of every server")
    add("--prompt-len", default="uniform:100:300", help="pdserve bench serve's SPEC")
    add("--output-len", type=int, default=64, help="max_tokens, EOS ignored")
    add("--seed", type=int, default=0, help="level C uses seed + C")
    add("--request-timeout", type=float, default=600.0, help="seconds")
    add("--slot-ctx", type=int, default=1024, help="llama.cpp context per slot (-c = x slots)")
    add("--no-continuous-batching", action="store_true", help="for transformers serve")
    add("--llama-version", default=DEFAULT_VERSION, help="llama-cpp-python sdist to build")
    add("--build-jobs", type=int, default=2, help="parallel compile jobs")
    add("--pdserve-config", type=Path, default=Path("configs/local.yaml"), help="base config")
    add("--model", default=None, help="model.source (default: embedded)")
    add("--out", type=Path, default=Path("bench-results/peers.json"))
    add("--quick", action="store_true", help="4 requests at C=1 (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests = "1", "4"
    args.servers = _names(parser, "--servers", args.servers, SERVERS)
    args.dtypes = _names(parser, "--dtypes", args.dtypes, DTYPES)
    args.concurrency = _ints(parser, "--concurrency", args.concurrency)
    requests = _ints(parser, "--requests", args.requests)
    if len(requests) not in (1, len(args.concurrency)):
        parser.error("--requests: give one number, or one per --concurrency level")
    args.requests = requests * len(args.concurrency) if len(requests) == 1 else requests
    if min(args.threads, args.output_len, args.slot_ctx, args.build_jobs) < 1:
        parser.error("--threads, --output-len, --slot-ctx and --build-jobs must be >= 1")
    return args


def _names(
    parser: argparse.ArgumentParser, flag: str, text: str, valid: Sequence[str]
) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        parser.error(f"{flag}: unknown {unknown}, valid: {', '.join(valid)}")
    return names


def _ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{flag}: comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag}: comma-separated integers >= 1, got {text!r}")
    return values


class PeersRun:
    """One benchmark invocation: owns the results dict and the per-run work folder."""

    def __init__(self, args: argparse.Namespace, hf_dir: Path, results: dict[str, Any]) -> None:
        self.args = args
        self.hf_dir = hf_dir
        self.results = results
        self.work_dir = args.out.resolve().parent / f"{args.out.stem}-runs"
        self.llama: dict[str, Any] | None = None
        self.llama_cache = LlamaCache.for_version(args.llama_version)

    def prepare_llama(self) -> None:
        """Builds (or finds) llama-server and the GGUFs; records the build."""
        self.llama = ensure_server(self.llama_cache, self.args.build_jobs)
        for dtype in self.args.dtypes:
            ensure_gguf(self.llama_cache, self.hf_dir, dtype)
        self.results["build"] = {"llama.cpp": self.llama}

    def spec(self, server: str, dtype: str, concurrency: int, port: int) -> ServerSpec:
        """The server to run `dtype` at `concurrency` (same spec = no restart needed)."""
        threads = self.args.threads
        if server == "llama.cpp":
            assert self.llama is not None, "prepare_llama() runs before llama.cpp specs"
            binary, gguf = Path(self.llama["binary"]), self.llama_cache.gguf(self.hf_dir, dtype)
            return llama_spec(binary, gguf, threads, concurrency, self.args.slot_ctx, port)
        if server == "transformers":
            model_dir = eos_free_model_dir(self.hf_dir, self.work_dir / "transformers-model")
            batching = not self.args.no_continuous_batching
            executable = BIN / "transformers"
            return transformers_spec(executable, model_dir, dtype, threads, port, batching)
        config_path = self.work_dir / f"{server}-{dtype}.yaml"
        colocated = server == "pdserve-colocated"
        config = pdserve_config(self.args.pdserve_config, dtype, threads, port, colocated)
        if self.args.model is not None:
            config["model"]["source"] = self.args.model
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return pdserve_spec(BIN / "pdserve", config_path, port, server)

    def run_server(self, server: str, dtype: str) -> None:
        """Every concurrency level of one server and dtype, restarting only when its spec
        changes; a failed start is recorded against the levels it would have served."""
        port = free_port()
        levels = list(zip(self.args.concurrency, self.args.requests))
        while levels:
            spec = self.spec(server, dtype, levels[0][0], port)
            group = [lv for lv in levels if self.spec(server, dtype, lv[0], port) == spec]
            levels = [lv for lv in levels if lv not in group]
            log = self.work_dir / f"{server}-{dtype}-c{group[0][0]}.log"
            print(f"[peers] starting {server} {dtype}: {' '.join(spec.command)}", flush=True)
            try:
                with RunningServer(spec, log) as running:
                    ready_s = running.wait_ready()
                    print(f"[peers] {server} ready in {ready_s:.1f} s", flush=True)
                    for concurrency, num_requests in group:
                        facts = {"server_ready_s": ready_s, "server_log": str(log)}
                        self.measure(spec, dtype, concurrency, num_requests, facts)
            except (ServerError, OSError) as exc:
                for concurrency, _ in group:
                    self.record(spec, dtype, concurrency, error=str(exc), server_log=str(log))

    def measure(
        self,
        spec: ServerSpec,
        dtype: str,
        concurrency: int,
        num_requests: int,
        facts: dict[str, Any],
    ) -> None:
        """One level against the running server, by `pdserve bench serve` in a subprocess."""
        out_dir = self.work_dir / f"{spec.name}-{dtype}-c{concurrency}"
        command = bench_command(self.args, spec, self.hf_dir, concurrency, num_requests, out_dir)
        facts.update(loadavg_before=list(os.getloadavg()), bench_command=command)
        print(f"[peers] {spec.name} {dtype} C={concurrency}: {' '.join(command)}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        results_file = out_dir / "results.json"
        if done.returncode != 0 or not results_file.is_file():
            facts["error"] = (
                f"bench exited {done.returncode}: {(done.stderr or done.stdout)[-800:]}"
            )
        else:
            facts["metrics"] = report.run_metrics(json.loads(results_file.read_text()))
            facts["bench_results"] = str(results_file)
        self.record(spec, dtype, concurrency, **facts)

    def record(self, spec: ServerSpec, dtype: str, concurrency: int, **fields: Any) -> None:
        """Appends one run and rewrites the summary JSON."""
        run = {
            "server": spec.name,
            "dtype": dtype,
            "concurrency": concurrency,
            "server_command": list(spec.command),
            "eos_handling": spec.eos_handling,
            "server_notes": spec.notes,
            "error": None,
            **fields,
        }
        self.results["runs"].append(run)
        report.write_json(self.args.out, self.results)
        if run["error"]:
            print(f"[peers] {spec.name} {dtype} C={concurrency} FAILED: {run['error']}", flush=True)


def bench_command(
    args: argparse.Namespace,
    spec: ServerSpec,
    hf_dir: Path,
    concurrency: int,
    num_requests: int,
    out_dir: Path,
) -> list[str]:
    """The `pdserve bench serve` command line of one level."""
    flags = {
        "--backend": "openai-chat",
        "--base-url": spec.base_url,
        "--tokenizer": str(hf_dir),
        "--concurrency": str(concurrency),
        "--num-requests": str(num_requests),
        "--prompt-len": args.prompt_len,
        "--output-len": f"fixed:{args.output_len}",
        "--seed": str(args.seed + concurrency),
        "--timeout": str(args.request_timeout),
        "--out": str(out_dir),
    }
    if spec.model is not None:
        flags["--model"] = spec.model
    pairs = [part for flag in flags.items() for part in flag]
    if not spec.send_ignore_eos:
        pairs.append("--no-ignore-eos-param")
    # llama-server closes each connection after a streamed reply (although it announces
    # keep-alive): every server gets a connection per request, alike.
    pairs.append("--no-keep-alive")
    return ["nice", "-n", "19", str(BIN / "pdserve"), "bench", "serve", *pairs, "--no-progress"]


def server_versions(llama: dict[str, Any] | None) -> dict[str, str]:
    """The version of each server as it reports it."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    versions = {
        "pdserve": version("pdserve"),
        "transformers": version("transformers"),
        "torch": version("torch"),
    }
    if llama is not None:
        commit = llama.get("llama_cpp_commit") or "unknown"
        sdist = llama["sdist_version"]
        versions["llama.cpp"] = f"{llama['version']}; commit {commit}; llama-cpp-python {sdist}"
    return versions


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.engine_decode import machine_facts  # imports torch and the engine
    from engine.embedded import resolve_model_source
    from pdserve.config import EMBEDDED_MODEL

    source = args.model or EMBEDDED_MODEL
    hf_dir = Path(resolve_model_source(source, None))
    options = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
    }
    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "command_line": [
            sys.executable,
            "-m",
            "benchmarks.peers",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "options": options,
        "model": {"source": source, "hf_dir": str(hf_dir)},
        "machine": machine_facts(),
        "build": None,
        "versions": {},
        "runs": [],
    }
    peers = PeersRun(args, hf_dir, results)
    if "llama.cpp" in args.servers:
        peers.prepare_llama()
    results["versions"] = server_versions(peers.llama)
    for server in args.servers:
        for dtype in args.dtypes:
            if server == "transformers" and dtype in QUANTIZED:
                results.setdefault("skipped", []).append(
                    f"transformers {dtype}: transformers serve has no int8 weight format here"
                )
                continue
            peers.run_server(server, dtype)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    report.write_json(args.out, results)
    chart = report.write_chart(
        args.out.with_suffix(".png"),
        results["runs"],
        f"{source}, {args.threads} threads, {args.output_len} output tokens",
    )
    print(report.markdown_table(results["runs"]))
    print(f"\nresults: {args.out}" + (f", chart: {chart}" if chart else ""))
    return 0 if all(run["error"] is None for run in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
