"""Accounting of the paged KV cache's blocks: who owns which block.

The block manager is the only owner of block accounting. It never touches tensors: callers
get block ids and turn them into cache slots through `PagedKVCache`. Owners are opaque string
keys (the router-minted transfer id of a request). Not thread-safe: call it from one thread
(the replica's event loop).
"""

from __future__ import annotations

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
        self._block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_owners(self) -> int:
        return len(self._block_tables)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    def allocate(self, owner: str, num_tokens: int) -> list[int]:
        """Gives `owner` enough blocks for `num_tokens` slots and returns its block table.

        Raises ResourceExhausted when there are not enough free blocks (nothing is allocated
        then) and ValueError when `owner` already holds blocks.
        """
        if owner in self._block_tables:
            raise ValueError(f"{owner} already holds blocks")
        num_blocks = self.blocks_needed(num_tokens)
        if num_blocks > self.num_free_blocks:
            raise ResourceExhausted(
                f"KV cache full: {num_tokens} tokens need {num_blocks} blocks, "
                f"{self.num_free_blocks} of {self.num_total_blocks} free"
            )
        block_table = [self._free_blocks.pop() for _ in range(num_blocks)]
        self._block_tables[owner] = block_table
        return block_table

    def free(self, owner: str) -> int:
        """Returns `owner`'s blocks to the free list; idempotent. Returns the number freed."""
        block_table = self._block_tables.pop(owner, None)
        if block_table is None:
            return 0
        self._free_blocks.extend(reversed(block_table))
        return len(block_table)

    def block_table(self, owner: str) -> list[int]:
        return self._block_tables[owner]

    def owns(self, owner: str) -> bool:
        return owner in self._block_tables
