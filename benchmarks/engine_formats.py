"""Weight formats side by side: decode speed and precision of fp32, bf16, weight-only int8
(`model.quantization: int8`) and int8 x int8 (`w8a8`), each quantized format with fp32 or bf16
activations, on one model, one run.

    python -m benchmarks.engine_formats [--model embedded:smollm2-135m-instruct] [--threads N]
        [--streams 32] [--new-tokens 32] [--repeats 3] [--out bench-results/engine_formats.json]

Speed: pdserve's engine (`EngineRig`, the decode batch loop's calls) with 1 stream and with N,
median decode step per format, interleaved across repeats; batch-1 roofline per format =
copy bandwidth / the bytes of its packed weights. Prefill (TTFT) of one 1,024-token prompt per
format and on torch's kernels. Precision, against fp32 (transformers on
the same linear layers the engine runs: pdserve's `NativeLinear`s swapped into the model):
perplexity over a fixed text, and greedy agreement over the benchmark prompts (streams
identical to fp32's; mean tokens before the first difference). Writes the JSON and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import engine_report as report
from benchmarks.engine_decode import machine_facts
from benchmarks.engine_memory import measure_copy_bandwidth
from benchmarks.engine_pd import EngineRig
from benchmarks.engine_workload import FIXED_TEXT, Workload, make_prompts
from engine.embedded import resolve_model_source
from engine.kernels.linear import NativeLinear, use_native_linears
from engine.kernels.native import kernel_status
from engine.model_loader import DTYPES, load_model
from pdserve.config import EMBEDDED_MODEL, ModelConfig

# name -> (model.dtype, model.quantization)
FORMATS = {
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8 (fp32 activations)": ("float32", "int8"),
    "int8 (bf16 activations)": ("bfloat16", "int8"),
    "w8a8 (fp32 activations)": ("float32", "w8a8"),
    "w8a8 (bf16 activations)": ("bfloat16", "w8a8"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_formats", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=1024,
                        help="prompt length of the prefill (TTFT) measurement")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine_formats.json"))
    return parser.parse_args(argv)


def packed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every native linear's packed weight and scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, NativeLinear):
            total += module.packed.numel() * module.packed.element_size()
            if module.scales is not None:
                total += module.scales.numel() * module.scales.element_size()
    return total


def _config(source: str, dtype: str, quantization: str, kernels: str) -> ModelConfig:
    return ModelConfig.model_validate(
        {"source": source, "dtype": dtype, "quantization": quantization, "kernels": kernels}
    )


def measure_prefill(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Seconds to prefill one `--prefill-tokens` prompt, per format and on torch's kernels
    (fp32, bf16), interleaved across repeats; the median of each."""
    workload = Workload(1, args.prefill_tokens, 2)
    prompts = make_prompts(tokenizer, workload)
    runs = {f"{name}, native": _config(args.model, *FORMATS[name], "native") for name in FORMATS}
    runs["fp32, torch kernels"] = _config(args.model, "float32", "none", "torch")
    runs["bf16, torch kernels"] = _config(args.model, "bfloat16", "none", "torch")
    rigs = {name: EngineRig(load_model(config), workload) for name, config in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in rigs}
    for rig in rigs.values():
        rig.run(prompts)  # warm-up
    for _ in range(args.repeats):
        for name, rig in rigs.items():
            seconds[name].append(rig.run(prompts)["prefill_s"])
    return {
        "prompt_tokens": args.prefill_tokens,
        "median_s": {name: statistics.median(values) for name, values in seconds.items()},
        "all_s": seconds,
    }


def measure_speed(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    workload = Workload(args.streams, args.prompt_tokens, args.new_tokens)
    rigs, described = {}, {}
    for name, (dtype, quantization) in FORMATS.items():
        loaded = load_model(_config(args.model, dtype, quantization, "native"))
        rigs[name] = (EngineRig(loaded, workload), packed_weight_bytes(loaded.model))
        described[name] = loaded.kernels
        rigs[name][0].run(prompts[:1])  # warm-up
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {n: {"1": [], "N": []} for n in FORMATS}
    copies = []
    for _ in range(args.repeats):
        for name, (rig, _) in rigs.items():
            raw[name]["1"].append(rig.run(prompts[:1]))
            raw[name]["N"].append(rig.run(prompts))
        copies.append(measure_copy_bandwidth(1024, repeats=3))
    bandwidth = max(copy["gb_per_s"] for copy in copies)
    speed = {}
    for name, (_, weight_bytes) in rigs.items():
        single = report.summarize_runs(raw[name]["1"], args.new_tokens)
        batch = report.summarize_runs(raw[name]["N"], args.new_tokens)
        roofline = bandwidth * 1e9 / weight_bytes
        speed[name] = {
            "kernels": described[name],
            "weight_bytes_per_step": weight_bytes,
            "single_tok_s": single["decode_tok_s"]["median"],
            "batch_tok_s": batch["decode_tok_s"]["median"],
            "roofline_single_tok_s": roofline,
            "single_vs_roofline": single["decode_tok_s"]["median"] / roofline,
            "runs": {"single": single, "batch": batch},
        }
    return {"copy_gb_per_s": bandwidth, "formats": speed}


def _reference_model(path: str, dtype: str, quantization: str) -> Any:
    """transformers' model on the engine's own linear layers for this format."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    module = kernel_status("native", dtype).module
    assert module is not None  # "native" raises instead
    use_native_linears(model, module, quantization)
    return model


def measure_precision(path: str, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_ids = torch.tensor([tokenizer(FIXED_TEXT)["input_ids"]])
    streams: dict[str, list[list[int]]] = {}
    result: dict[str, Any] = {"text_tokens": int(text_ids.shape[1])}
    for name, (dtype, quantization) in FORMATS.items():
        model = _reference_model(path, dtype, quantization)
        with torch.inference_mode():
            loss = model(text_ids, labels=text_ids).loss.float().item()
            streams[name] = [
                model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
                for prompt in prompts
            ]
        result[name] = {"perplexity": math.exp(loss)}
    for name in FORMATS:
        pairs = list(zip(streams[name], streams["fp32"]))
        result[name]["streams_identical_to_fp32"] = sum(a == b for a, b in pairs)
        result[name]["mean_tokens_before_first_difference"] = sum(
            _common_prefix(a, b) for a, b in pairs
        ) / len(pairs)
    result["num_streams"] = len(prompts)
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def write_chart(path: Path, speed: dict[str, Any], streams: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(speed)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "single_tok_s", "batch 1"),
                             (axes[1], "batch_tok_s", f"{streams} streams")):
        axis.bar(range(len(names)), [speed[n][key] for n in names], color="#4c72b0")
        if key == "single_tok_s":
            axis.scatter(range(len(names)), [speed[n]["roofline_single_tok_s"] for n in names],
                         marker="_", s=600, color="#c44e52", label="roofline")
            axis.legend()
        axis.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"pdserve engine, {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model_source(args.model, None)
    workload = Workload(args.streams, args.prompt_tokens, args.new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_prompts(tokenizer, workload)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "engine_formats",
        "started": started.isoformat(),
        "machine": machine_facts(),
        "load_average_before": os.getloadavg(),
        "threads": args.threads,
        "workload": vars(workload),
        "speed": measure_speed(args, prompts),
        "prefill": measure_prefill(args, tokenizer),
        "precision": measure_precision(path, prompts[:8], args.new_tokens),
        "load_average_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out, result)
    write_chart(args.out.with_suffix(".png"), result["speed"]["formats"], args.streams)
    for name, figures in result["speed"]["formats"].items():
        precision = result["precision"][name]
        print(f"{name:26} batch 1 {figures['single_tok_s']:6.1f} tok/s "
              f"({100 * figures['single_vs_roofline']:.0f}% of roofline), "
              f"{args.streams} streams {figures['batch_tok_s']:6.1f} tok/s, "
              f"ppl {precision['perplexity']:.3f}, "
              f"{precision['streams_identical_to_fp32']}/{result['precision']['num_streams']} "
              f"streams = fp32")
    for name, seconds in result["prefill"]["median_s"].items():
        print(f"prefill of {args.prefill_tokens} tokens, {name:32} {seconds:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
