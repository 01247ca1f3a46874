"""Shared-memory segments for the same-node "shm" transport: files under /dev/shm, mapped.

The sender creates one segment per transfer (`pdkv-<transfer_id>-<random>`, mode 0600), copies
each chunk into it and sends only its offset over the control stream; the receiver maps the
segment read-only and copies each chunk straight into the cache. Either side unlinks the
segment when its part ends (unlinking twice is harmless), so a segment outlives a transfer only
if both processes die during it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from kvtransfer.errors import TransferDataLoss, TransferUnavailable

SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^pdkv-(?P<transfer_id>[0-9A-Za-z_-]{1,64})-[0-9a-f]{8}$")


@dataclass(frozen=True)
class ShmRef:
    """Where one chunk's bytes lie."""

    segment: str
    offset: int
    length: int


# A segment untouched this long belongs to a transfer whose both ends died: remove it.
STALE_SEGMENT_AGE_S = 600.0
_SWEEP_EVERY_S = 60.0
_last_sweep = 0.0


def sweep_stale_segments(force: bool = False) -> int:
    """Unlinks transfer segments older than STALE_SEGMENT_AGE_S (at most once a minute per
    process unless `force`); returns how many. The one path the two ends cannot clean: both
    died mid-transfer."""
    global _last_sweep
    now = time.time()
    if not force and now - _last_sweep < _SWEEP_EVERY_S:
        return 0
    _last_sweep = now
    removed = 0
    for path in SHM_DIR.glob("pdkv-*"):
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > STALE_SEGMENT_AGE_S:
                path.unlink()
                removed += 1
    return removed


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class ShmSegmentWriter:
    """One transfer's segment on the sender side. Not thread-safe (the send thread owns it)."""

    def __init__(self, transfer_id: str, num_bytes: int) -> None:
        if not shm_available():
            raise TransferUnavailable(f"the shm transport needs a writable {SHM_DIR}")
        sweep_stale_segments()
        self.name = f"pdkv-{transfer_id}-{secrets.token_hex(4)}"
        if not _NAME_RE.match(self.name):
            raise TransferDataLoss(f"transfer id {transfer_id!r} cannot name a segment")
        self._path = SHM_DIR / self.name
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, num_bytes)
            self._map = mmap.mmap(fd, num_bytes)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)
        self._offset = 0

    def append(self, data: bytes | memoryview) -> ShmRef:
        """Copies `data` after the previous chunk; returns where it lies."""
        view = memoryview(data).cast("B")
        end = self._offset + view.nbytes
        if end > len(self._map):
            raise TransferDataLoss(f"segment {self.name}: chunk past the end of the segment")
        self._map[self._offset : end] = view
        ref = ShmRef(self.name, self._offset, view.nbytes)
        self._offset = end
        return ref

    def close(self) -> None:
        """Unmaps and unlinks; idempotent."""
        if not self._map.closed:
            self._map.close()
        self.unlink()

    def unlink(self) -> None:
        # The receiver may have unlinked it first.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class ShmSegmentReader:
    """One transfer's segment on the receiver side, mapped read-only on first use."""

    def __init__(self, transfer_id: str, expected_bytes: int) -> None:
        self._transfer_id = transfer_id
        self._expected_bytes = expected_bytes
        self._name = ""
        self._map: mmap.mmap | None = None

    def view(self, ref: ShmRef) -> memoryview:
        """The chunk's bytes. Raises DATA_LOSS for a foreign, missing, wrongly sized segment
        or a range outside it. Valid until `close`."""
        self._open(ref.segment)
        assert self._map is not None, "_open mapped the segment"
        if ref.offset + ref.length > len(self._map):
            raise TransferDataLoss(f"segment {ref.segment}: range past its end")
        return memoryview(self._map)[ref.offset : ref.offset + ref.length]

    def close(self) -> None:
        """Unmaps and unlinks the segment; idempotent. Views must no longer be used."""
        if self._map is not None and not self._map.closed:
            # A view still alive keeps the mapping until it goes; unlinking works regardless.
            with contextlib.suppress(BufferError):
                self._map.close()
        if self._name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self._name)

    def _open(self, name: str) -> None:
        if self._map is not None:
            if name != self._name:
                raise TransferDataLoss(f"segment {name}: a transfer uses one segment")
            return
        match = _NAME_RE.match(name)
        if match is None or match.group("transfer_id") != self._transfer_id:
            raise TransferDataLoss(f"segment {name!r} does not belong to this transfer")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise TransferDataLoss(f"segment {name}: cannot open ({exc.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size != self._expected_bytes:
                raise TransferDataLoss(
                    f"segment {name}: {size} bytes, expected {self._expected_bytes}"
                )
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._name = name
