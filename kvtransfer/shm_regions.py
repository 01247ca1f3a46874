"""First-fit allocation of byte ranges of one pool segment. Pure bookkeeping, not thread-safe:
the pool (kvtransfer/shm_pool.py) calls it under its lock."""

from __future__ import annotations

import bisect


class RegionAllocator:
    """Free ranges of [0, num_bytes), sorted by start and coalesced on free. Every range is a
    multiple of `alignment` long and starts at a multiple of it."""

    def __init__(self, num_bytes: int, alignment: int) -> None:
        if alignment < 1 or num_bytes < 0 or num_bytes % alignment:
            raise ValueError(f"num_bytes {num_bytes} must be a multiple of {alignment}")
        self.num_bytes = num_bytes
        self.alignment = alignment
        # Parallel sorted lists: starts[i] .. starts[i] + lengths[i] is free.
        self._starts: list[int] = [0] if num_bytes else []
        self._lengths: list[int] = [num_bytes] if num_bytes else []

    @property
    def free_bytes(self) -> int:
        return sum(self._lengths)

    def round_up(self, num_bytes: int) -> int:
        return -(-num_bytes // self.alignment) * self.alignment

    def allocate(self, num_bytes: int) -> int | None:
        """Start of a free range of `round_up(num_bytes)` bytes, now taken; None when no free
        range is that long."""
        size = self.round_up(num_bytes)
        for index, length in enumerate(self._lengths):
            if length >= size:
                start = self._starts[index]
                if length == size:
                    del self._starts[index], self._lengths[index]
                else:
                    self._starts[index] += size
                    self._lengths[index] -= size
                return start
        return None

    def free(self, start: int, num_bytes: int) -> None:
        """Returns a range `allocate` gave out; raises ValueError when it overlaps a free one
        (a double free)."""
        size = self.round_up(num_bytes)
        index = bisect.bisect_left(self._starts, start)
        before_end = self._starts[index - 1] + self._lengths[index - 1] if index else 0
        after_start = self._starts[index] if index < len(self._starts) else self.num_bytes
        if start < before_end or start + size > after_start or start < 0:
            raise ValueError(f"range [{start}, {start + size}) is not allocated")
        self._starts.insert(index, start)
        self._lengths.insert(index, size)
        if index + 1 < len(self._starts) and start + size == self._starts[index + 1]:
            self._lengths[index] += self._lengths.pop(index + 1)
            del self._starts[index + 1]
        if index and before_end == start:
            self._lengths[index - 1] += self._lengths.pop(index)
            del self._starts[index]
