"""The prefill replica's waiting queue and how batches are formed from it.

Owns the FIFO of jobs not yet run. A batch takes jobs from the head while they fit the token
and size budgets and the KV cache has blocks for them; a job that does not fit ends the batch
(FIFO: no overtaking, so long prompts are not starved). Not thread-safe: event loop only.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from pdserve.errors import ResourceExhausted
from prefill_worker.job import PrefillJob


class PrefillBatcher:
    def __init__(
        self, block_manager: BlockManager, max_batch_tokens: int, max_batch_size: int,
        max_waiting: int,
    ) -> None:
        self._block_manager = block_manager
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_size = max_batch_size
        self._max_waiting = max_waiting
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
        self._waiting.append(job)

    def remove(self, job: PrefillJob) -> bool:
        try:
            self._waiting.remove(job)
        except ValueError:
            return False
        return True

    def next_batch(self) -> list[PrefillJob]:
        """Pops the next batch and allocates its blocks (owner = transfer id). Empty when the
        head job cannot get blocks yet."""
        batch: list[PrefillJob] = []
        num_tokens = 0
        while self._waiting and len(batch) < self._max_batch_size:
            job = self._waiting[0]
            # A prompt longer than the token budget still runs, alone.
            if batch and num_tokens + job.num_prompt_tokens > self._max_batch_tokens:
                break
            if not self._block_manager.can_allocate(job.num_prompt_tokens):
                break
            self._waiting.popleft()
            job.block_table = self._block_manager.allocate(job.transfer_id, job.num_prompt_tokens)
            batch.append(job)
            num_tokens += job.num_prompt_tokens
        return batch
