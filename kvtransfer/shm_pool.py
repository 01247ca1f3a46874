"""The sender's pool of shared memory for the "shm" transport: one segment per prefill replica,
allocated, mapped and touched once, carved into regions leased one per transfer.

Life of a region: `try_lease` stamps it for a transfer -> the push's feeder thread `append`s
chunks -> the lease is closed when the transfer ends, whatever the outcome -> the pool takes
it back only when no receiver holds its lock (kvtransfer/shm_region.py); otherwise it stays
quarantined and is tried again at every later lease, `reclaim` and `stats`. So a region is
never rewritten while a receiver may still copy from it, and a receiver that failed, was
cancelled or died still gives its region back as soon as its push is over.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from kvtransfer.errors import TransferCancelled, TransferDataLoss, TransferUnavailable
from kvtransfer.shm_region import (
    OFD_LOCKS_AVAILABLE,
    STAMP_BYTES,
    WIPED_STAMP,
    encode_stamp,
    try_lock,
    unlock,
)
from kvtransfer.shm_regions import RegionAllocator
from kvtransfer.shm_segment import (
    SHM_DIR,
    ShmRef,
    create_segment,
    pool_segment_name,
    sweep_stale_segments,
)

logger = logging.getLogger(__name__)

# Touch the pool in steps of this many bytes (a bounded temporary buffer of zeros).
_TOUCH_STEP_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of one pool."""

    num_bytes: int
    num_free_bytes: int
    num_active_leases: int
    num_quarantined_regions: int
    # Regions that had to wait for a receiver's lock when their transfer ended (cumulative).
    num_deferred_reclaims: int


@dataclass(frozen=True)
class _Region:
    start: int
    num_bytes: int


class ShmPool:
    """A pool segment owned by this process. Thread-safe: one lock guards the allocator and the
    region lists; it is not held while chunks are copied."""

    def __init__(self, num_bytes: int) -> None:
        """Creates, allocates, maps and touches a segment of `num_bytes` rounded up to whole
        STAMP_BYTES. Blocks for the touch (about a memcpy of the pool). Raises
        TransferUnavailable (no /dev/shm, no room there, no open-file-description locks)."""
        if not OFD_LOCKS_AVAILABLE:
            raise TransferUnavailable("the shm pool needs open-file-description locks (Linux)")
        sweep_stale_segments()
        self._regions = RegionAllocator(-(-num_bytes // STAMP_BYTES) * STAMP_BYTES, STAMP_BYTES)
        self.num_bytes = self._regions.num_bytes
        self.name = pool_segment_name()
        # Kept open for the whole life of the pool: the exclusive probes go through it.
        self._fd = create_segment(self.name, self.num_bytes)
        # A process that exits without `close` still unlinks it (a killed one leaves it to the
        # sweep of dead owners).
        self._unlink = weakref.finalize(self, _unlink_quietly, SHM_DIR / self.name)
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(self._fd, self.num_bytes, flags=flags)
        except BaseException:
            self._unlink()
            os.close(self._fd)
            raise
        self._touch()
        self._lock = threading.Lock()
        self._active: set[PoolLease] = set()
        self._quarantined: list[_Region] = []
        self._num_deferred = 0
        self._closed = False

    def try_lease(self, transfer_id: str, num_bytes: int) -> PoolLease | None:
        """A region stamped for `transfer_id` with room for `num_bytes` payload bytes, or None
        when no free region is large enough (the caller falls back). Raises ValueError for a
        transfer id that cannot stamp a region, TransferUnavailable after `close`."""
        stamp = encode_stamp(transfer_id, num_bytes)
        with self._lock:
            if self._closed:
                raise TransferUnavailable("the shm pool is closed")
            self._retry_quarantined()
            start = self._regions.allocate(STAMP_BYTES + num_bytes)
            if start is None:
                return None
            region = _Region(start, self._regions.round_up(STAMP_BYTES + num_bytes))
            lease = PoolLease(self, region, num_bytes)
            self._active.add(lease)
        self._map[start : start + len(stamp)] = stamp
        return lease

    def fits(self, num_bytes: int) -> bool:
        """Whether a transfer of `num_bytes` could ever fit this pool."""
        return STAMP_BYTES + num_bytes <= self.num_bytes

    def reclaim(self) -> int:
        """Tries the quarantined regions again; returns how many are still held by a receiver."""
        with self._lock:
            if not self._closed:
                self._retry_quarantined()
            return len(self._quarantined)

    def stats(self) -> PoolStats:
        with self._lock:
            if not self._closed:
                self._retry_quarantined()
            return PoolStats(
                num_bytes=self.num_bytes,
                num_free_bytes=self._regions.free_bytes,
                num_active_leases=len(self._active),
                num_quarantined_regions=len(self._quarantined),
                num_deferred_reclaims=self._num_deferred,
            )

    def close(self) -> None:
        """Unlinks the segment at once (receivers that mapped it keep their mapping); unmaps it
        when the last lease has ended. Idempotent. Transfers still running go on until they end
        (a receiver that has not opened the segment yet fails them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._unlink()
            idle = not self._active
        if idle:
            self._release_memory()

    def _copy(self, offset: int, view: memoryview) -> None:
        # The lease holds its own lock around this, so the region is still its own.
        self._map[offset : offset + view.nbytes] = view

    def _end_lease(self, lease: PoolLease) -> None:
        with self._lock:
            self._active.discard(lease)
            if self._closed:
                release = not self._active
            else:
                release = False
                if not self._try_free(lease.region):
                    self._quarantined.append(lease.region)
                    self._num_deferred += 1
        if release:
            self._release_memory()

    def _retry_quarantined(self) -> None:
        still_held = [region for region in self._quarantined if not self._try_free(region)]
        self._quarantined = still_held

    def _try_free(self, region: _Region) -> bool:
        """Frees the region unless a receiver holds its lock; called under the pool lock."""
        if not try_lock(self._fd, region.start, region.num_bytes, exclusive=True):
            return False
        try:
            # A receiver that locks after this finds no stamp and refuses the region.
            self._map[region.start : region.start + len(WIPED_STAMP)] = WIPED_STAMP
        finally:
            unlock(self._fd, region.start, region.num_bytes)
        self._regions.free(region.start, region.num_bytes)
        return True

    def _touch(self) -> None:
        """Writes every page once so that no transfer faults on it later (MAP_POPULATE alone
        may leave pages mapped read-only until their first write)."""
        zeros = bytes(min(_TOUCH_STEP_BYTES, self.num_bytes))
        for start in range(0, self.num_bytes, len(zeros)):
            end = min(start + len(zeros), self.num_bytes)
            self._map[start:end] = zeros[: end - start]

    def _release_memory(self) -> None:
        self._map.close()
        os.close(self._fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class PoolLease:
    """One transfer's region. `append` runs on the thread feeding the push and `close` on the
    sending thread; a lock makes `close` wait for a copy in progress, after which `append`
    refuses, so nothing is written into the region once it may be handed to another
    transfer."""

    def __init__(self, pool: ShmPool, region: _Region, num_bytes: int) -> None:
        self._pool = pool
        self.region = region
        self._next = region.start + STAMP_BYTES
        self._end = self._next + num_bytes
        self._lock = threading.Lock()
        self._closed = False

    def append(self, data: bytes | memoryview) -> ShmRef:
        """Copies `data` after the previous chunk; returns where it lies. Raises CANCELLED
        after `close`, DATA_LOSS past the leased size."""
        view = memoryview(data).cast("B")
        with self._lock:
            if self._closed:
                raise TransferCancelled(f"segment {self._pool.name}: the transfer has ended")
            if self._next + view.nbytes > self._end:
                raise TransferDataLoss(f"segment {self._pool.name}: chunk past the leased region")
            offset = self._next
            self._pool._copy(offset, view)
            self._next += view.nbytes
        return ShmRef(self._pool.name, offset, view.nbytes)

    def close(self) -> None:
        """Ends the lease (idempotent); the region goes back to the pool, or to quarantine while
        a receiver still reads it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool._end_lease(self)
