"""Where a sender of the "shm" transport puts each transfer's bytes: a region of its pool, or a
fresh segment of its own when the pool is off (`shm_pool_mb: 0`), cannot hold the transfer or
could not be created. Falling back with the pool on is never silent: a WARNING the first time
per reason, and `ShmStats.num_fallback_transfers` for the metrics.

Owned by one GrpcSender (made with `via_shm`); `writer` is called by its sending threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from kvtransfer.errors import TransferDataLoss, TransferError
from kvtransfer.shm_pool import PoolLease, ShmPool
from kvtransfer.shm_segment import ShmChunkWriter, ShmSegmentWriter

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class ShmStats:
    """A snapshot of one sender's shm staging, for metrics."""

    # Size of the pool; 0 when there is none (configured off, or it could not be created).
    pool_bytes: int
    pool_free_bytes: int
    num_active_leases: int
    # Regions whose transfer ended while a receiver still held them: reused once released.
    num_quarantined_regions: int
    num_deferred_reclaims: int
    # Transfers staged in the pool, and in a fresh segment although a pool was configured.
    num_pool_transfers: int
    num_fallback_transfers: int


class ShmStaging:
    """The pool (if configured) plus the fallback; thread-safe."""

    def __init__(self, pool_mb: int) -> None:
        """Starts creating and touching the pool on a thread of its own (about a memcpy of
        `pool_mb` MiB), so neither the caller (maybe an event loop) nor a transfer pays for it;
        a transfer that comes first waits for it. A pool that cannot be created is logged
        (WARNING) and every transfer then falls back, counted; nothing raises here."""
        self._pool_mb = pool_mb
        self._pool: ShmPool | None = None
        self._lock = threading.Lock()
        self._num_pool = 0
        self._num_fallback = 0
        self._warned: set[str] = set()
        self._ready = threading.Event()
        if pool_mb > 0:
            threading.Thread(target=self._create_pool, name="shm-pool", daemon=True).start()
        else:
            self._ready.set()

    @contextlib.contextmanager
    def writer(self, transfer_id: str, num_bytes: int) -> Iterator[ShmChunkWriter]:
        """Where the `num_bytes` of one transfer go, for the duration of the `with` block; on
        leaving it (any outcome) the region or segment is released and later appends raise
        CANCELLED. Blocks while the pool is still being created, and to create a fallback
        segment. Raises TransferUnavailable (no
        /dev/shm or no room there, pool closed) or DATA_LOSS (a transfer id unfit to name a
        segment)."""
        self._ready.wait()
        staged = self._lease(transfer_id, num_bytes)
        try:
            yield staged
        finally:
            staged.close()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Blocks until the pool is created (or failed to be); False on timeout."""
        return self._ready.wait(timeout_s)

    def stats(self) -> ShmStats:
        """Never blocks on the pool's creation (reports no pool until it is ready)."""
        created = self._pool if self._ready.is_set() else None
        pool = created.stats() if created is not None else None
        with self._lock:
            return ShmStats(
                pool_bytes=pool.num_bytes if pool else 0,
                pool_free_bytes=pool.num_free_bytes if pool else 0,
                num_active_leases=pool.num_active_leases if pool else 0,
                num_quarantined_regions=pool.num_quarantined_regions if pool else 0,
                num_deferred_reclaims=pool.num_deferred_reclaims if pool else 0,
                num_pool_transfers=self._num_pool,
                num_fallback_transfers=self._num_fallback,
            )

    def close(self) -> None:
        """Unlinks the pool now (after its creation, if under way); its memory goes when the
        last transfer using it ends."""
        self._ready.wait()
        if self._pool is not None:
            self._pool.close()

    def _create_pool(self) -> None:
        try:
            self._pool = ShmPool(self._pool_mb * MIB)
        except (TransferError, OSError) as exc:
            self._warn_once("pool unavailable", f"cannot create the shm pool: {exc}")
        finally:
            self._ready.set()

    def _lease(self, transfer_id: str, num_bytes: int) -> PoolLease | ShmSegmentWriter:
        pool = self._pool
        if pool is not None:
            try:
                lease = pool.try_lease(transfer_id, num_bytes)
            except ValueError as exc:
                raise TransferDataLoss(str(exc)) from None
            if lease is not None:
                with self._lock:
                    self._num_pool += 1
                return lease
            reason = "transfer larger than the pool" if not pool.fits(num_bytes) else "pool full"
            self._fall_back(reason, transfer_id, num_bytes)
        elif self._pool_mb > 0:
            self._fall_back("pool unavailable", transfer_id, num_bytes)
        return ShmSegmentWriter(transfer_id, num_bytes)

    def _fall_back(self, reason: str, transfer_id: str, num_bytes: int) -> None:
        with self._lock:
            self._num_fallback += 1
        self._warn_once(
            reason,
            f"shm transfer {transfer_id} ({num_bytes} bytes) uses a fresh segment ({reason};"
            f" pool of {self._pool_mb} MiB, kv_transfer.shm_pool_mb): slower, every page"
            " faults. Counted in num_fallback_transfers; further ones log at DEBUG.",
        )

    def _warn_once(self, reason: str, message: str) -> None:
        with self._lock:
            first = reason not in self._warned
            self._warned.add(reason)
        logger.log(logging.WARNING if first else logging.DEBUG, message)
