"""Engine decode benchmark: pdserve's shared engine against plain transformers, in one run, on
one model, dtype and thread count.

    python -m benchmarks.engine_decode [--model embedded:smollm2-135m-instruct]
        [--dtypes float32,bfloat16] [--threads N] [--streams 32] [--prompt-tokens 64]
        [--new-tokens 64] [--repeats 3] [--out bench-results/engine_decode.json] [--quick]

For each dtype, each repeat runs (interleaved, so drift hits every side alike):
transformers static-batch `generate()` with N streams and with 1; transformers' continuous
batching `generate_batch()` with N requests; pdserve's `ModelRunner` over the paged KV cache
with N streams and with 1 (one packed prefill, then one forward per step, like the decode
batch loop); and a memory copy, for the batch-1 roofline = weight bytes per step / bandwidth
(bytes read + written per second). Decode steps are timed one by one on both sides; decode
tokens/s = streams / median step. Writes the JSON (every raw figure and the machine facts)
and a PNG beside it, and prints the ratios against the targets (>= 1.5x generate() with N
streams; batch 1 >= 80% of roofline).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import engine_report as report
from benchmarks.engine_hf import run_generate, run_generate_batch
from benchmarks.engine_memory import measure_copy_bandwidth, weight_bytes_per_step
from benchmarks.engine_pd import EngineRig
from benchmarks.engine_workload import Workload, make_prompts
from engine.embedded import resolve_model_source
from engine.model_loader import DTYPES, load_model
from pdserve.config import EMBEDDED_MODEL, ModelConfig

RUN_KEYS = tuple(report.RUN_LABELS)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model.source (folder, hub id)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads for every side")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams (batch)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind")
    parser.add_argument("--copy-mib", type=int, default=1024,
                        help="size of each of the copy test's two buffers")
    parser.add_argument("--kernels", default="auto", choices=("auto", "native", "torch"),
                        help="model.kernels of the pdserve engine (a second engine on torch's "
                        "kernels runs beside it unless this is torch)")
    parser.add_argument("--no-generate-batch", action="store_true",
                        help="skip transformers' generate_batch()")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine_decode.json"))
    parser.add_argument("--quick", action="store_true",
                        help="4 streams, 8+8 tokens, 1 repeat, float32, 16 MiB copy (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.prompt_tokens, args.new_tokens = 4, 8, 8
        args.repeats, args.copy_mib, args.dtypes = 1, 16, "float32"
    args.dtypes = [name for name in args.dtypes.split(",") if name]
    unknown = [name for name in args.dtypes if name not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"--dtypes: unknown {unknown}, valid: {', '.join(DTYPES)}")
    if min(args.threads, args.streams, args.prompt_tokens, args.repeats, args.copy_mib) < 1:
        parser.error("--threads, --streams, --prompt-tokens, --repeats, --copy-mib must be >= 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first comes from the prefill)")
    return args


def run_dtype(args: argparse.Namespace, dtype: str, path: str) -> dict[str, Any]:
    """Every measurement of one dtype; raw runs are interleaved across repeats."""
    workload = Workload(args.streams, args.prompt_tokens, args.new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_prompts(tokenizer, workload)
    # Prompts have equal lengths, so nothing is padded; generate() only wants an id.
    pad_token_id = next(
        (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
    )
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    model_config = ModelConfig.model_validate(
        {"source": args.model, "dtype": dtype, "kernels": args.kernels}
    )
    loaded = load_model(model_config)
    rig = EngineRig(loaded, workload)
    # The same engine on torch's kernels, side by side (unless that is the engine above).
    torch_rig = None
    if not loaded.kernels.startswith("torch"):
        torch_config = model_config.model_copy(update={"kernels": "torch"})
        torch_rig = EngineRig(load_model(torch_config), workload)
    single = Workload(1, workload.num_prompt_tokens, workload.num_new_tokens)
    raw: dict[str, list[dict[str, Any]]] = {key: [] for key in RUN_KEYS}
    copies = []
    errors: dict[str, str] = {}
    # One untimed pass of each kind first: allocator, oneDNN kernels, lazy imports.
    run_generate(hf_model, prompts[:1], single, pad_token_id)
    rig.run(prompts[:1])
    if torch_rig is not None:
        torch_rig.run(prompts[:1])
    for _ in range(args.repeats):
        raw["hf_static_batch"].append(run_generate(hf_model, prompts, workload, pad_token_id))
        raw["pdserve_batch"].append(rig.run(prompts))
        raw["hf_static_single"].append(run_generate(hf_model, prompts[:1], single, pad_token_id))
        raw["pdserve_single"].append(rig.run(prompts[:1]))
        if torch_rig is not None:
            raw["pdserve_torch_batch"].append(torch_rig.run(prompts))
            raw["pdserve_torch_single"].append(torch_rig.run(prompts[:1]))
        if not args.no_generate_batch and "hf_continuous_batch" not in errors:
            try:
                raw["hf_continuous_batch"].append(run_generate_batch(hf_model, prompts, workload))
            except Exception as exc:  # recorded: whether it runs here is part of the result
                errors["hf_continuous_batch"] = f"{type(exc).__name__}: {exc}"
        copies.append(measure_copy_bandwidth(args.copy_mib, repeats=3))
    if torch_rig is None:
        errors["pdserve_torch_batch"] = errors["pdserve_torch_single"] = (
            f"the engine above runs on torch's kernels: {loaded.kernels}"
        )
    result = _summarize(args, workload, hf_model, raw, copies, errors)
    result["kernels"] = loaded.kernels
    return result


def _summarize(
    args: argparse.Namespace,
    workload: Workload,
    hf_model: Any,
    raw: dict[str, list[dict[str, Any]]],
    copies: list[dict[str, float]],
    errors: dict[str, str],
) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for key in RUN_KEYS:
        if raw[key]:
            runs[key] = report.summarize_runs(raw[key], workload.num_new_tokens)
        else:
            runs[key] = {"error": errors.get(key, "skipped (--no-generate-batch)")}
    weight_bytes = weight_bytes_per_step(hf_model)
    # The best copy is the highest bandwidth seen: the strictest roofline.
    bandwidth = max(copy["gb_per_s"] for copy in copies)
    result: dict[str, Any] = {
        "weight_bytes_per_step": weight_bytes,
        "copy_gb_per_s": bandwidth,
        "copy_runs": copies,
        "roofline_single_tok_s": bandwidth * 1e9 / weight_bytes,
        "runs": runs,
        "streams_equal": {
            "batch": report.streams_equal(raw["pdserve_batch"], raw["hf_static_batch"]),
            "single": report.streams_equal(raw["pdserve_single"], raw["hf_static_single"]),
        },
    }
    result["ratios"] = report.ratios(result)
    result["targets_met"] = report.targets_met(result["ratios"])
    return result


def machine_facts() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "loadavg": list(os.getloadavg()),
        "cpu_pressure": _cpu_pressure(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": {name: metadata.version(name) for name in ("torch", "transformers")},
    }


def cpu_model() -> dict[str, Any]:
    """The CPU's model name and the flags the kernels dispatch on (Linux; empty elsewhere)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name", ""), "flags": [f for f in wanted if f in flags]}


def _cpu_pressure() -> str | None:
    """Linux PSI line `some avg10=...`: how much other work competed for the CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model_source(args.model, None)
    started = machine_facts()
    results = {dtype: run_dtype(args, dtype, path) for dtype in args.dtypes}
    document = {
        "settings": {
            "model": args.model,
            "threads": args.threads,
            "num_streams": args.streams,
            "num_prompt_tokens": args.prompt_tokens,
            "num_new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "copy_mib": args.copy_mib,
            "quick": args.quick,
        },
        "targets": {
            "batch_decode_vs_hf_static": report.TARGET_BATCH_VS_GENERATE,
            "single_decode_vs_roofline": report.TARGET_SINGLE_VS_ROOFLINE,
        },
        "machine": {"start": started, "end": machine_facts()},
        "results": results,
    }
    report.write_json(args.out, document)
    chart = args.out.with_suffix(".png")
    report.write_chart(chart, results)
    print("\n".join(report.table_lines(results)))
    print(f"wrote {args.out} and {chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
