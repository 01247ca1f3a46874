"""The prefill replica's waiting queue and how passes are formed from it.

Owns the FIFO of jobs whose prompt is not fully computed yet. A pass takes jobs from the head,
each computing a chunk of at most `max_chunk_tokens` of its prompt, while the pass stays within
the token and size budgets and the KV cache has blocks for them. A prompt longer than a chunk
keeps its place at the head and is computed over several passes, so prompts queued behind it
join the passes in between instead of waiting for all of it (chunked prefill); a job leaves
the queue with the pass that computes its last chunk. A job that cannot get blocks ends the
pass (FIFO: no overtaking, so long prompts are not starved). Not thread-safe: event loop only.

Blocks for the whole prompt are allocated when a job enters its first pass. With prefix
caching, the job first takes references on the cached blocks of its prompt's longest cached
prefix, and only its uncached tokens are computed. A job whose next uncached block is being
computed by a job ahead of it in the same pass ends the pass: the worker caches a block as
soon as the pass that wrote it succeeded, so in the next pass the job computes only its tail.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.prefix_cache import hash_blocks
from pdserve.errors import InvalidArgument, ResourceExhausted
from prefill_worker.job import PrefillJob


class PrefillBatcher:
    def __init__(
        self, block_manager: BlockManager, max_batch_tokens: int, max_batch_size: int,
        max_waiting: int, prefix_caching: bool = False, max_chunk_tokens: int | None = None,
    ) -> None:
        self._block_manager = block_manager
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_size = max_batch_size
        self._max_waiting = max_waiting
        self._prefix_caching = prefix_caching
        self._max_chunk_tokens = max_chunk_tokens or max_batch_tokens
        self._waiting: deque[PrefillJob] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: PrefillJob) -> None:
        """Queues a job; raises ResourceExhausted when the queue is full (the router waits
        and tries again) and InvalidArgument when the prompt can never fit the cache."""
        if len(self._waiting) >= self._max_waiting:
            raise ResourceExhausted(f"prefill queue full ({self._max_waiting} waiting)")
        needed = self._block_manager.blocks_needed(job.num_prompt_tokens)
        if needed > self._block_manager.num_total_blocks:
            raise InvalidArgument(
                "prompt", f"{job.num_prompt_tokens} tokens exceed this replica's KV cache"
            )
        if self._prefix_caching:
            job.block_hashes = _hashes_or_none(job, self._block_manager.block_size)
        self._waiting.append(job)

    def remove(self, job: PrefillJob) -> bool:
        try:
            self._waiting.remove(job)
        except ValueError:
            return False
        return True

    def next_batch(self) -> list[PrefillJob]:
        """The jobs of the next pass, each with `num_chunk_tokens` set to what the pass
        computes of it. Jobs entering their first pass get their blocks (owner = transfer id),
        sharing cached prefix blocks. Empty when the head job cannot get blocks yet."""
        batch: list[PrefillJob] = []
        num_tokens = 0
        writing: set[bytes] = set()  # hashes of the full blocks this pass writes
        for job in list(self._waiting):
            budget = self._max_batch_tokens - num_tokens
            if len(batch) >= self._max_batch_size or budget <= 0:
                break
            if job.block_table is None and not self._allocate(job, bool(batch), writing):
                break
            job.num_chunk_tokens = min(job.num_prompt_tokens_left, self._max_chunk_tokens, budget)
            if job.is_last_chunk:
                self._waiting.remove(job)
            writing.update(self._hashes_written(job))
            batch.append(job)
            num_tokens += job.num_chunk_tokens
        return batch

    def _hashes_written(self, job: PrefillJob) -> list[bytes]:
        """Hashes of the full blocks the job's current chunk completes."""
        block_size = self._block_manager.block_size
        first = job.num_computed_tokens // block_size
        end = (job.num_computed_tokens + job.num_chunk_tokens) // block_size
        return job.block_hashes[first:end]

    def _allocate(self, job: PrefillJob, behind_others: bool, writing: set[bytes]) -> bool:
        """Gives a job entering its first pass its blocks; False when it has to wait."""
        blocks = self._block_manager
        cached = blocks.cached_prefix(job.num_prompt_tokens, job.block_hashes)
        if behind_others and self._waits_for(job, len(cached), writing):
            return False
        if not blocks.can_allocate(job.num_prompt_tokens, cached):
            return False
        job.block_table = blocks.allocate(job.transfer_id, job.num_prompt_tokens, cached)
        job.num_cached_tokens = len(cached) * blocks.block_size
        job.num_computed_tokens = job.num_cached_tokens
        return True

    def _waits_for(self, job: PrefillJob, num_cached_blocks: int, writing: set[bytes]) -> bool:
        """Whether `job` would reuse more blocks by waiting for this pass."""
        max_blocks = (job.num_prompt_tokens - 1) // self._block_manager.block_size
        if num_cached_blocks >= min(max_blocks, len(job.block_hashes)):
            return False
        return job.block_hashes[num_cached_blocks] in writing


def _hashes_or_none(job: PrefillJob, block_size: int) -> list[bytes]:
    """The prompt's block hashes; none (no caching) for token ids that cannot be hashed: the
    pass rejects those anyway."""
    try:
        return hash_blocks(job.request.prompt_token_ids, block_size)
    except ValueError:
        return []
