"""The prefill replica's waiting queue and how batches are formed from it.

Owns the FIFO of jobs not yet run. A batch takes jobs from the head while they fit the token
and size budgets and the KV cache has blocks for them; a job that does not fit ends the batch
(FIFO: no overtaking, so long prompts are not starved). Not thread-safe: event loop only.

With prefix caching, a job takes references on the cached blocks of its prompt's longest cached
prefix when it is batched, and only its uncached tokens count against the token budget. A job
whose next uncached block is being computed by a job ahead of it in the same batch ends the
batch: in the next pass that block is cached, so it computes only its tail then.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.prefix_cache import hash_blocks
from pdserve.errors import ResourceExhausted
from prefill_worker.job import PrefillJob


class PrefillBatcher:
    def __init__(
        self, block_manager: BlockManager, max_batch_tokens: int, max_batch_size: int,
        max_waiting: int, prefix_caching: bool = False,
    ) -> None:
        self._block_manager = block_manager
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_size = max_batch_size
        self._max_waiting = max_waiting
        self._prefix_caching = prefix_caching
        self._waiting: deque[PrefillJob] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: PrefillJob) -> None:
        """Queues a job; raises ResourceExhausted when the queue is full or the prompt can
        never fit the cache."""
        if len(self._waiting) >= self._max_waiting:
            raise ResourceExhausted(f"prefill queue full ({self._max_waiting} waiting)")
        needed = self._block_manager.blocks_needed(job.num_prompt_tokens)
        if needed > self._block_manager.num_total_blocks:
            raise ResourceExhausted(
                f"prompt of {job.num_prompt_tokens} tokens exceeds this replica's KV cache"
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
        """Pops the next batch and allocates its blocks (owner = transfer id), sharing cached
        prefix blocks. Empty when the head job cannot get blocks yet."""
        batch: list[PrefillJob] = []
        num_tokens = 0
        computing: set[bytes] = set()  # hashes of full blocks the batch's pass will write
        blocks = self._block_manager
        while self._waiting and len(batch) < self._max_batch_size:
            job = self._waiting[0]
            cached = blocks.cached_prefix(job.num_prompt_tokens, job.block_hashes)
            num_new = job.num_prompt_tokens - len(cached) * blocks.block_size
            # A prompt longer than the token budget still runs, alone.
            if batch and num_tokens + num_new > self._max_batch_tokens:
                break
            if batch and self._waits_for(job, len(cached), computing):
                break
            if not blocks.can_allocate(job.num_prompt_tokens, cached):
                break
            self._waiting.popleft()
            job.block_table = blocks.allocate(job.transfer_id, job.num_prompt_tokens, cached)
            job.num_cached_tokens = len(cached) * blocks.block_size
            computing.update(job.block_hashes[len(cached) :])
            batch.append(job)
            num_tokens += num_new
        return batch

    def _waits_for(self, job: PrefillJob, num_cached_blocks: int, computing: set[bytes]) -> bool:
        """Whether `job` would reuse more blocks by waiting for this batch's pass."""
        max_blocks = (job.num_prompt_tokens - 1) // self._block_manager.block_size
        if num_cached_blocks >= min(max_blocks, len(job.block_hashes)):
            return False
        return job.block_hashes[num_cached_blocks] in computing


def _hashes_or_none(job: PrefillJob, block_size: int) -> list[bytes]:
    """The prompt's block hashes; none (no caching) for token ids that cannot be hashed: the
    pass rejects those anyway."""
    try:
        return hash_blocks(job.request.prompt_token_ids, block_size)
    except ValueError:
        return []
