"""Accounting of the paged KV cache's blocks: who references which block.

The block manager is the only owner of block accounting. It never touches tensors: callers
get block ids and turn them into cache slots through `PagedKVCache`. Owners are opaque string
keys (the router-minted transfer id of a request). Not thread-safe: call it from one thread
(the replica's event loop).

Growth (decode and colocated replicas): an owner's table may gain fresh blocks at its end
(`can_grow`/`grow`) as its sequence generates tokens; the table keeps its identity, so the
sequence, a KV sink or a pass that holds the list sees the new blocks.

Prefix caching (prefill replicas; decode replicas never use it): after a pass has computed an
owner's full prompt blocks, `cache_blocks` indexes them by their chained hashes
(`engine.prefix_cache`). When the owner frees them they stay cached, unreferenced and evictable
(least recently used first), instead of returning to the free list. A later prompt finds its
longest cached prefix with `cached_prefix` and shares those blocks through
`allocate(..., cached_blocks=...)`. Shared blocks are read-only: nothing writes a block once it
is cached, and a block is reused for other KV only when no owner references it (ref count 0),
so never while a pass or a send of an owner may read it.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.prefix_cache import PrefixIndex
from pdserve.errors import ResourceExhausted


class BlockManager:
    """Allocates fixed-size blocks of `block_size` token slots to owners."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.block_size = block_size
        self.num_total_blocks = num_blocks
        # Pop from the end: low block ids are handed out first, which keeps tests readable.
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._ref_counts = [0] * num_blocks
        self._block_tables: dict[str, list[int]] = {}
        self._prefix = PrefixIndex()

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-used or freed ones plus unreferenced cached
        ones (evicted on demand). Equals `num_total_blocks` when no owner holds a block."""
        return len(self._free_blocks) + self._prefix.num_evictable_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose KV is indexed for reuse, referenced or not."""
        return self._prefix.num_cached_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return self._prefix.num_evictable_blocks

    @property
    def num_owners(self) -> int:
        return len(self._block_tables)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def cached_prefix(self, num_tokens: int, block_hashes: Sequence[bytes]) -> list[int]:
        """Cached blocks holding the longest block-aligned prefix of a prompt of `num_tokens`
        tokens with full-block hashes `block_hashes`. Leaves at least the last prompt token
        uncached, so the pass that computes the rest still yields the next token's logits.
        Changes nothing: pass the result to `can_allocate`/`allocate` right away."""
        max_blocks = max(0, (num_tokens - 1) // self.block_size)
        return self._prefix.match(block_hashes[:max_blocks])

    def can_allocate(self, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        num_fresh = self.blocks_needed(num_tokens) - len(cached_blocks)
        return num_fresh <= self._num_allocatable(cached_blocks)

    def allocate(
        self, owner: str, num_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> list[int]:
        """Gives `owner` enough blocks for `num_tokens` slots and returns its block table: a
        reference on each of `cached_blocks` (from `cached_prefix`) first, then fresh blocks,
        evicting unreferenced cached blocks (LRU) when the free list runs out.

        Raises ResourceExhausted when there are not enough blocks (nothing is allocated then),
        ValueError when `owner` already holds blocks, or a cached block is no longer cached or
        more than the table holds.
        """
        if owner in self._block_tables:
            raise ValueError(f"{owner} already holds blocks")
        self._check_cached(num_tokens, cached_blocks)
        num_blocks = self.blocks_needed(num_tokens)
        num_fresh = num_blocks - len(cached_blocks)
        if num_fresh > self._num_allocatable(cached_blocks):
            raise ResourceExhausted(
                f"KV cache full: {num_tokens} tokens need {num_fresh} new blocks, "
                f"{self.num_free_blocks} of {self.num_total_blocks} free"
            )
        for block in cached_blocks:
            self._reference(block)
        block_table = list(cached_blocks) + [self._take_fresh() for _ in range(num_fresh)]
        self._block_tables[owner] = block_table
        return block_table

    def num_blocks_to_grow(self, owner: str, num_tokens: int) -> int:
        """Fresh blocks `owner`'s table lacks to cover `num_tokens` slots (0 when it does).
        Raises ValueError when `owner` holds no blocks."""
        return max(0, self.blocks_needed(num_tokens) - len(self._owned_table(owner)))

    def can_grow(self, owner: str, num_tokens: int) -> bool:
        """Whether `grow(owner, num_tokens)` would succeed now. Changes nothing."""
        return self.num_blocks_to_grow(owner, num_tokens) <= self.num_free_blocks

    def grow(self, owner: str, num_tokens: int) -> int:
        """Appends fresh blocks to `owner`'s table until it covers `num_tokens` slots and
        returns how many it added (0 when it already did). The table is the list `allocate`
        returned, extended in place, so whoever holds it sees the new blocks.

        Called by a decode replica between steps, when no pass reads or writes the table.
        Raises ResourceExhausted when too few blocks are free (nothing is allocated then),
        ValueError when `owner` holds no blocks."""
        num_fresh = self.num_blocks_to_grow(owner, num_tokens)
        if num_fresh > self.num_free_blocks:
            raise ResourceExhausted(
                f"KV cache full: {owner} needs {num_fresh} more blocks for {num_tokens} tokens, "
                f"{self.num_free_blocks} of {self.num_total_blocks} free"
            )
        self._block_tables[owner].extend(self._take_fresh() for _ in range(num_fresh))
        return num_fresh

    def cache_blocks(self, owner: str, block_hashes: Sequence[bytes]) -> int:
        """Indexes `owner`'s leading blocks under `block_hashes` (one hash per full block whose
        KV a pass has now written, in table order). Call only after that pass succeeded: a
        cached block is never written again. Blocks already cached and hashes already indexed
        (the same prefix computed twice) are skipped. Returns the number newly cached."""
        block_table = self._block_tables.get(owner, [])
        return sum(self._prefix.add(h, block) for h, block in zip(block_hashes, block_table))

    def free(self, owner: str) -> int:
        """Drops `owner`'s references; idempotent. Returns the number of blocks it held.

        A block nobody references any more returns to the free list, or, when cached, becomes
        evictable. The table's tail is released first, so a prompt's last blocks are evicted
        before its first ones (a cached tail is useless without its head)."""
        block_table = self._block_tables.pop(owner, None)
        if block_table is None:
            return 0
        for block in reversed(block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] > 0:
                continue
            if self._prefix.is_cached(block):
                self._prefix.park(block)
            else:
                self._free_blocks.append(block)
        return len(block_table)

    def block_table(self, owner: str) -> list[int]:
        return self._block_tables[owner]

    def owns(self, owner: str) -> bool:
        return owner in self._block_tables

    def _owned_table(self, owner: str) -> list[int]:
        block_table = self._block_tables.get(owner)
        if block_table is None:
            raise ValueError(f"{owner} holds no blocks")
        return block_table

    def _num_allocatable(self, cached_blocks: Sequence[int]) -> int:
        """Blocks left for fresh allocation once `cached_blocks` are referenced."""
        num_taken = sum(1 for block in cached_blocks if self._prefix.is_evictable(block))
        return self.num_free_blocks - num_taken

    def _check_cached(self, num_tokens: int, cached_blocks: Sequence[int]) -> None:
        if len(cached_blocks) > self.blocks_needed(num_tokens):
            raise ValueError(
                f"{len(cached_blocks)} cached blocks exceed {num_tokens} tokens' block table"
            )
        if len(set(cached_blocks)) != len(cached_blocks):
            raise ValueError(f"cached blocks repeat: {list(cached_blocks)}")
        for block in cached_blocks:
            # Sharing a block that was evicted and reused would expose another owner's writes.
            if not self._prefix.is_cached(block):
                raise ValueError(f"block {block} is not cached (evicted since the lookup?)")

    def _reference(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            self._prefix.unpark(block)
        self._ref_counts[block] += 1

    def _take_fresh(self) -> int:
        block = self._free_blocks.pop() if self._free_blocks else self._prefix.evict()
        assert self._ref_counts[block] == 0, f"block {block} handed out while referenced"
        self._ref_counts[block] = 1
        return block
