"""Receive buffers of the TCP side channel, reused across pushes."""

from __future__ import annotations

import threading

# Buffers kept for reuse: a few pushes at once, each holding up to three while reading ahead.
MAX_POOLED_BUFFERS = 8


class BufferPool:
    """Receive buffers reused across pushes, so a chunk lands in memory already touched rather
    than page-faulting on every transfer. Thread-safe. Callers bound every size before asking
    (by the chunk limit, `kv_transfer.max_message_bytes`)."""

    def __init__(self, max_buffers: int = MAX_POOLED_BUFFERS) -> None:
        self._max_buffers = max_buffers
        self._lock = threading.Lock()
        self._free: list[bytearray] = []
        # Buffers allocated since construction (a reused one counts once).
        self.num_allocated = 0

    def take(self, num_bytes: int) -> bytearray:
        """A buffer of at least `num_bytes`: a pooled one when one is large enough."""
        with self._lock:
            for index, buffer in enumerate(self._free):
                if len(buffer) >= num_bytes:
                    return self._free.pop(index)
            self.num_allocated += 1
        return bytearray(num_bytes)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            self._free.append(buffer)
            # Keep the largest: a small buffer would be replaced at the next big chunk.
            self._free.sort(key=len, reverse=True)
            del self._free[self._max_buffers :]
