"""The receiver's mappings of senders' pool segments: each segment is mapped once (read-only,
pre-faulted) and kept, by name, for every later transfer from that sender.

Bounded: at most `max_idle` mappings no transfer is using are kept (least recently used go
first), and those whose segment was unlinked (its sender closed or died) are dropped within
_PRUNE_EVERY_S. Mappings in use are never unmapped under a reader. Thread-safe: the receiver's
push threads share one cache.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvtransfer.errors import TransferDataLoss, TransferUnavailable
from kvtransfer.shm_region import STAMP_BYTES
from kvtransfer.shm_segment import (
    PEER_OPEN_FLAGS,
    POOL_NAME_RE,
    SHM_DIR,
    check_peer_segment,
    sweep_stale_segments,
)

# The largest pool segment a receiver maps: the bound of kv_transfer.shm_pool_mb (1 TiB).
MAX_POOL_SEGMENT_BYTES = 1_048_576 * 1024 * 1024
DEFAULT_MAX_IDLE = 32
_PRUNE_EVERY_S = 10.0


@dataclass(eq=False)
class ShmMapping:
    """One mapped pool segment. `view` spans it; slices of it are valid while `users` > 0."""

    name: str
    identity: tuple[int, int, int]  # (st_dev, st_ino, st_size) when mapped
    view: memoryview
    _map: mmap.mmap
    users: int = 0
    retired: bool = field(default=False)

    @property
    def num_bytes(self) -> int:
        return self.view.nbytes

    def unmap(self) -> None:
        # A buffer still exported somewhere keeps the mapping until it goes.
        with contextlib.suppress(BufferError):
            self.view.release()
            self._map.close()


class ShmMappingCache:
    """Pool segments mapped by this receiver, by name."""

    def __init__(self, max_idle: int = DEFAULT_MAX_IDLE) -> None:
        if max_idle < 0:
            raise ValueError(f"max_idle: {max_idle} must be >= 0")
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._mappings: OrderedDict[str, ShmMapping] = OrderedDict()
        self._last_prune = time.monotonic()
        self._closed = False
        # Segments mapped since the start (a hit is a transfer that mapped nothing).
        self.num_maps = 0

    @property
    def num_mapped(self) -> int:
        with self._lock:
            return len(self._mappings)

    def open(self, name: str) -> tuple[int, ShmMapping]:
        """Opens and maps (or finds mapped) the pool segment `name` from the wire; returns an
        fd of the segment (for the caller's lock; the caller closes it) and the mapping (the
        caller `release`s it). Checks, before mapping: the pool name form, a regular file of
        this user, a size that is a multiple of STAMP_BYTES within MAX_POOL_SEGMENT_BYTES.
        Raises DATA_LOSS, or UNAVAILABLE after `close`."""
        if POOL_NAME_RE.match(name) is None:
            raise TransferDataLoss(f"segment {name!r} is not a pool segment")
        try:
            fd = os.open(SHM_DIR / name, PEER_OPEN_FLAGS)
        except OSError as exc:
            raise TransferDataLoss(f"segment {name}: cannot open ({exc.strerror})") from None
        try:
            info = check_peer_segment(name, fd, STAMP_BYTES, MAX_POOL_SEGMENT_BYTES)
            if info.st_size % STAMP_BYTES:
                raise TransferDataLoss(f"segment {name}: size {info.st_size} is not whole pages")
            identity = (info.st_dev, info.st_ino, info.st_size)
            return fd, self._acquire(name, identity)
        except BaseException:
            os.close(fd)
            raise

    def release(self, mapping: ShmMapping) -> None:
        """A reader is done with `mapping`; its slices must be gone."""
        with self._lock:
            mapping.users -= 1
            if mapping.users == 0 and (mapping.retired or self._closed):
                mapping.unmap()
            self._evict()

    def close(self) -> None:
        """Unmaps every idle mapping now, the others when released. Idempotent."""
        with self._lock:
            self._closed = True
            for mapping in self._mappings.values():
                mapping.retired = True
                if mapping.users == 0:
                    mapping.unmap()
            self._mappings.clear()

    def _acquire(self, name: str, identity: tuple[int, int, int]) -> ShmMapping:
        with self._lock:
            if self._closed:
                raise TransferUnavailable("the receiver's shm mappings are closed")
            self._prune()
            mapping = self._mappings.get(name)
            if mapping is not None and mapping.identity != identity:
                self._retire(mapping)  # same name, another file: never seen in practice
                mapping = None
            if mapping is None:
                mapping = self._map(name, identity)
                self._mappings[name] = mapping
            self._mappings.move_to_end(name)
            mapping.users += 1
            self._evict()
            return mapping

    def _map(self, name: str, identity: tuple[int, int, int]) -> ShmMapping:
        # Python's mmap keeps a dup of the fd it maps, which would keep that file description
        # (and any region lock taken through it) alive as long as the mapping: so the mapping
        # gets a description of its own, checked to be the same file.
        try:
            fd = os.open(SHM_DIR / name, PEER_OPEN_FLAGS)
        except OSError as exc:
            raise TransferDataLoss(f"segment {name}: cannot open ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino, info.st_size) != identity:
                raise TransferDataLoss(f"segment {name}: replaced while being mapped")
            # MAP_POPULATE maps the sender's (already allocated) pages now, not one by one.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            segment = mmap.mmap(fd, identity[2], flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.num_maps += 1
        return ShmMapping(name, identity, memoryview(segment), segment)

    def _retire(self, mapping: ShmMapping) -> None:
        del self._mappings[mapping.name]
        mapping.retired = True
        if mapping.users == 0:
            mapping.unmap()

    def _evict(self) -> None:
        idle = [mapping for mapping in self._mappings.values() if mapping.users == 0]
        for mapping in idle[: max(len(idle) - self._max_idle, 0)]:
            self._retire(mapping)

    def _prune(self) -> None:
        """Drops idle mappings of unlinked or replaced segments (at most every few seconds)."""
        now = time.monotonic()
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        sweep_stale_segments()
        for mapping in [m for m in self._mappings.values() if m.users == 0]:
            try:
                info = os.stat(SHM_DIR / mapping.name, follow_symlinks=False)
                current = (info.st_dev, info.st_ino, info.st_size)
            except FileNotFoundError:
                current = None
            if current != mapping.identity:
                self._retire(mapping)
