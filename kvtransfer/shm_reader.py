"""The receiver's view of one transfer's shared-memory bytes, whichever kind of segment the
sender used: a region of a pool segment (mapped once per receiver, kvtransfer/shm_mappings.py)
or a segment of the transfer's own (kvtransfer/shm_segment.py).

A ReceiveSession opens one reader at the transfer's first shm chunk, asks it for each chunk's
bytes and closes it when the push is over, whatever the outcome; closing is what tells the
sender it may reuse a pool region (kvtransfer/shm_region.py).
"""

from __future__ import annotations

import os
from typing import Protocol

from kvtransfer.errors import TransferDataLoss
from kvtransfer.shm_mappings import ShmMapping, ShmMappingCache
from kvtransfer.shm_region import STAMP_BYTES, STAMP_USED_BYTES, stamp_matches, try_lock
from kvtransfer.shm_segment import POOL_NAME_RE, ShmRef, ShmSegmentReader


class ShmReader(Protocol):
    def view(self, ref: ShmRef) -> memoryview:
        """The chunk's bytes, valid until `close` (the caller releases each view after use).
        Raises DATA_LOSS for a name, range or region that is not this transfer's."""
        ...

    def close(self) -> None:
        """Idempotent; after it the sender may reuse or remove the bytes."""
        ...


def open_shm_reader(
    transfer_id: str, num_bytes: int, first: ShmRef, mappings: ShmMappingCache | None
) -> ShmReader:
    """The reader for a transfer of `num_bytes` payload bytes whose first shm chunk is `first`.
    Without `mappings` a pool segment is mapped for this transfer only (tests, fuzzing)."""
    if POOL_NAME_RE.match(first.segment) is None:
        return ShmSegmentReader(transfer_id, num_bytes)
    if mappings is None:
        return PoolRegionReader(ShmMappingCache(max_idle=0), transfer_id, num_bytes)
    return PoolRegionReader(mappings, transfer_id, num_bytes)


class PoolRegionReader:
    """One transfer's region of a sender's pool segment. Holds a shared lock on the region from
    the first chunk until `close`. Driven by one receiver thread."""

    def __init__(self, mappings: ShmMappingCache, transfer_id: str, num_bytes: int) -> None:
        self._mappings = mappings
        self._transfer_id = transfer_id
        self._num_bytes = num_bytes
        self._fd = -1
        self._mapping: ShmMapping | None = None
        self._data_start = 0
        self._data_end = 0

    def view(self, ref: ShmRef) -> memoryview:
        if self._mapping is None:
            try:
                self._open(ref)
            except BaseException:
                self.close()  # a refused region is not held a moment longer
                raise
        assert self._mapping is not None, "_open mapped the region"
        if ref.segment != self._mapping.name:
            raise TransferDataLoss(f"segment {ref.segment}: a transfer uses one segment")
        end = ref.offset + ref.length
        if ref.length < 0 or ref.offset < self._data_start or end > self._data_end:
            raise TransferDataLoss(
                f"segment {ref.segment}: range [{ref.offset}, {end}) outside the transfer's"
                f" region [{self._data_start}, {self._data_end})"
            )
        return self._mapping.view[ref.offset : end]

    def close(self) -> None:
        # Closing the fd drops the region's lock: the sender may reuse it from here on.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._mapping is not None:
            self._mappings.release(self._mapping)
            self._mapping = None

    def _open(self, first: ShmRef) -> None:
        """Maps the segment, locks the region the first chunk starts and checks its stamp."""
        region_start = first.offset - STAMP_BYTES
        if region_start < 0 or region_start % STAMP_BYTES:
            raise TransferDataLoss(
                f"segment {first.segment}: offset {first.offset} does not start a region"
            )
        fd, mapping = self._mappings.open(first.segment)
        self._fd, self._mapping = fd, mapping
        region_end = first.offset + self._num_bytes
        if region_end > mapping.num_bytes:
            raise TransferDataLoss(f"segment {first.segment}: the region runs past its end")
        if not try_lock(fd, region_start, region_end - region_start, exclusive=False):
            raise TransferDataLoss(
                f"segment {first.segment}: region at {region_start} was already taken back by"
                " the sender (its transfer ended)"
            )
        stamp = mapping.view[region_start : region_start + STAMP_USED_BYTES]
        try:
            if not stamp_matches(stamp, self._transfer_id, self._num_bytes):
                raise TransferDataLoss(
                    f"segment {first.segment}: region at {region_start} is not leased to"
                    f" transfer {self._transfer_id} (the sender ended it, or a wrong offset)"
                )
        finally:
            stamp.release()
        self._data_start, self._data_end = first.offset, region_end
