"""The plain-transformers side of the decode benchmark: static-batch `generate()` and the
library's own continuous batching `generate_batch()`.

`generate()` runs greedy with `min_new_tokens` so EOS never stops a stream early. A stopping
criterion that never stops reads the clock each time a token has been chosen: the first read
ends the prefill, and the gaps between reads are the decode steps (forward, logits processing
and the greedy pick), timed step by step like pdserve's.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import (
    ContinuousBatchingConfig,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from benchmarks.engine_workload import Workload

# generate_batch pages hold this many tokens (transformers' default page size).
_CB_PAGE_TOKENS = 256


class _StepClock(StoppingCriteria):
    """Never stops generation; records when each token was chosen."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_generate(
    model: Any, prompts: list[list[int]], workload: Workload, pad_token_id: int
) -> dict[str, Any]:
    """One timed static-batch `generate()` over `prompts`, with per-step times."""
    input_ids = torch.tensor(prompts)
    clock = _StepClock()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=workload.num_new_tokens,
            min_new_tokens=workload.num_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    total_s = time.perf_counter() - started
    if len(clock.times) != workload.num_new_tokens:
        raise RuntimeError(f"generate() chose {len(clock.times)} tokens per stream, "
                           f"expected {workload.num_new_tokens}")
    step_s = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
    return {
        "total_s": total_s,
        "prefill_s": clock.times[0] - started,
        "decode_s": sum(step_s),
        "step_s": step_s,
        "token_ids": output[:, input_ids.shape[1] :].tolist(),
        "num_streams": len(prompts),
    }


def run_generate_batch(model: Any, prompts: list[list[int]], workload: Workload) -> dict[str, Any]:
    """One timed `generate_batch()` over `prompts` (EOS disabled so every stream makes
    `num_new_tokens`), with a KV cache sized for the workload: left to itself it sizes the
    cache from free memory, which on CPU means most of the machine's RAM. Raises RuntimeError
    when a request comes back short (it logs failed requests rather than raising)."""
    pages_per_stream = -(-(workload.num_prompt_tokens + workload.num_new_tokens) // _CB_PAGE_TOKENS)
    cb_config = ContinuousBatchingConfig(
        num_blocks=len(prompts) * pages_per_stream + 1,
        max_batch_tokens=max(len(prompts) * workload.num_prompt_tokens, _CB_PAGE_TOKENS),
        max_memory_percent=0.05,
    )
    generation_config = GenerationConfig(
        max_new_tokens=workload.num_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    # Not under inference_mode: its worker thread updates tensors created here in place.
    started = time.perf_counter()
    outputs = model.generate_batch(
        inputs=prompts, generation_config=generation_config, continuous_batching_config=cb_config
    )
    total_s = time.perf_counter() - started
    generated = [list(output.generated_tokens) for output in outputs.values()]
    expected = [workload.num_new_tokens] * len(prompts)
    if [len(tokens) for tokens in generated] != expected:
        raise RuntimeError(
            f"generate_batch returned {[len(t) for t in generated]} tokens, expected {expected}"
        )
    return {
        "total_s": total_s,
        "num_streams": len(generated),
        "num_tokens": sum(len(tokens) for tokens in generated),
    }
