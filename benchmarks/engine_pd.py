"""The pdserve side of the decode benchmark: the shared engine (`ModelRunner` over a paged KV
cache) driven the way the decode batch loop drives it: one packed prefill of every prompt, then
one forward per step in which every stream feeds its last token, sampled greedily.

Block tables are shuffled block ids (fixed seed): a busy replica's tables are fragmented, so
the benchmark does not get contiguous contexts for free.
"""

from __future__ import annotations

import random
import time
from typing import Any

from benchmarks.engine_workload import Workload
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.model_loader import LoadedModel
from engine.model_runner import ModelRunner, SequenceChunk
from engine.sampler import sample
from pdserve.messages import SamplingParams

BLOCK_SIZE = 16  # the configs' default KV block size


class EngineRig:
    """A runner and a paged cache sized for `workload`; reusable (each run overwrites the KV
    it reads)."""

    def __init__(self, loaded: LoadedModel, workload: Workload) -> None:
        self.workload = workload
        blocks_per_stream = -(-(workload.num_prompt_tokens + workload.num_new_tokens) // BLOCK_SIZE)
        num_blocks = workload.num_streams * blocks_per_stream
        spec = KVCacheSpec(
            num_layers=loaded.num_layers,
            num_kv_heads=loaded.num_kv_heads,
            head_dim=loaded.head_dim,
            dtype=loaded.dtype,
            block_size=BLOCK_SIZE,
            num_blocks=num_blocks,
        )
        self.runner = ModelRunner(loaded, PagedKVCache(spec))
        block_ids = list(range(num_blocks))
        random.Random(0).shuffle(block_ids)
        self._tables = [
            block_ids[index * blocks_per_stream : (index + 1) * blocks_per_stream]
            for index in range(workload.num_streams)
        ]

    def run(self, prompts: list[list[int]]) -> dict[str, Any]:
        """Prefill + decode of `prompts` (at most `workload.num_streams`); times each part."""
        workload = self.workload
        greedy = [SamplingParams(max_tokens=workload.num_new_tokens)] * len(prompts)
        tables = self._tables[: len(prompts)]
        started = time.perf_counter()
        logits = self.runner.forward([SequenceChunk(p, 0, t) for p, t in zip(prompts, tables)])
        outputs = [[token] for token in sample(logits, greedy, [0] * len(prompts))]
        prefill_s = time.perf_counter() - started
        step_times = [
            self._step(prompts, tables, outputs, greedy) for _ in range(workload.num_decode_steps)
        ]
        return {
            "prefill_s": prefill_s,
            "decode_s": sum(step_times),
            "total_s": prefill_s + sum(step_times),
            "step_s": step_times,
            "token_ids": outputs,
            "num_streams": len(prompts),
        }

    def _step(
        self,
        prompts: list[list[int]],
        tables: list[list[int]],
        outputs: list[list[int]],
        greedy: list[SamplingParams],
    ) -> float:
        started = time.perf_counter()
        chunks = [
            SequenceChunk([out[-1]], len(prompt) + len(out) - 1, table)
            for prompt, out, table in zip(prompts, outputs, tables)
        ]
        logits = self.runner.forward(chunks)
        tokens = sample(logits, greedy, [len(out) for out in outputs])
        for out, token in zip(outputs, tokens):
            out.append(token)
        return time.perf_counter() - started
