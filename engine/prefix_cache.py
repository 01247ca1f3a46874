"""The prefix cache's index: computed full KV blocks, found by a hash of every token up to
their end.

A full block's hash chains over the whole prefix: `blake2b(parent hash || this block's token
ids packed as int64)`. Equal hashes therefore mean equal tokens at equal positions, hence equal
KV. A replica serves one model in one dtype, so the hash needs no model salt; hashes never leave
the replica, so native byte order is fine.

`PrefixIndex` maps hashes to block ids and keeps the cached blocks nobody references in LRU
order: those, and only those, may be evicted. It holds no reference counts: `BlockManager`
(its only caller) tells it when a cached block loses its last reference (`park`) or gains one
(`unpark`). Not thread-safe: the replica's event loop only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

HASH_BYTES = 32


def hash_blocks(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids`, in order (a trailing partial block has
    none). Raises ValueError when a token id does not fit in int64 or `block_size` < 1."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        try:
            packed = array("q", token_ids[start : start + block_size]).tobytes()
        except OverflowError as exc:
            raise ValueError(f"token id out of int64 range in block at {start}: {exc}") from None
        digest = hashlib.blake2b(parent, digest_size=HASH_BYTES)
        digest.update(packed)
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Which blocks hold KV of which hashed prefix, and which of them are evictable."""

    def __init__(self) -> None:
        self._block_by_hash: dict[bytes, int] = {}
        self._hash_by_block: dict[int, bytes] = {}
        # Cached blocks with no reference, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_by_block)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_by_block

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def match(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Blocks of the longest run of `block_hashes`, from the first, that are all cached."""
        blocks: list[int] = []
        for block_hash in block_hashes:
            block = self._block_by_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def add(self, block_hash: bytes, block: int) -> bool:
        """Indexes `block` (referenced: not evictable) under `block_hash`. Returns False, and
        changes nothing, when the hash is already indexed or the block already cached."""
        if block_hash in self._block_by_hash or block in self._hash_by_block:
            return False
        self._block_by_hash[block_hash] = block
        self._hash_by_block[block] = block_hash
        return True

    def park(self, block: int) -> None:
        """A cached block lost its last reference: it becomes the most recently used
        evictable block."""
        assert block in self._hash_by_block, f"block {block} is not cached"
        self._evictable[block] = None

    def unpark(self, block: int) -> None:
        """A cached block is referenced again: it must not be evicted."""
        self._evictable.pop(block, None)

    def evict(self) -> int:
        """Forgets the least recently used unreferenced block and returns it (now free).
        Raises LookupError when no block is evictable."""
        if not self._evictable:
            raise LookupError("no evictable cached block")
        block, _ = self._evictable.popitem(last=False)
        del self._block_by_hash[self._hash_by_block.pop(block)]
        return block
