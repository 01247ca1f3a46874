"""Shared-memory segments of the same-node "shm" transport: files under /dev/shm, mapped.

Two kinds, told apart by name (the receiver refuses any other name):
- a pool segment, `pdkvpool-<pid>-<16 hex>`: owned by one sender process (`pid`), mapped once
  and reused across transfers (kvtransfer/shm_pool.py); receivers map it once too
  (kvtransfer/shm_mappings.py). Only its owner unlinks it, or the sweep once the owner is dead.
- a transfer segment, `pdkv-<transfer_id>-<8 hex>` (this file): one per transfer, when the
  pool is off (`shm_pool_mb: 0`) or has no room. Either side unlinks it when its part ends
  (unlinking twice is harmless), so it outlives a transfer only if both processes die.

Both are created with mode 0600 and fully allocated up front (a full /dev/shm fails cleanly
instead of killing the writer with SIGBUS on first touch).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvtransfer.errors import TransferCancelled, TransferDataLoss, TransferUnavailable

SHM_DIR = Path("/dev/shm")
_TRANSFER_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_NAME_RE = re.compile(r"^pdkv-(?P<transfer_id>[0-9A-Za-z_-]{1,64})-[0-9a-f]{8}$")
# pid_max is at most 2**22 on Linux: seven digits.
POOL_NAME_RE = re.compile(r"^pdkvpool-(?P<pid>[1-9][0-9]{0,6})-[0-9a-f]{16}$")
# Flags for opening a segment named by a peer: never follow a link, never block on a FIFO.
PEER_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class ShmRef:
    """Where one chunk's bytes lie."""

    segment: str
    offset: int
    length: int


class ShmChunkWriter(Protocol):
    """Where a sender puts one transfer's chunks (a pool region or a transfer segment)."""

    def append(self, data: bytes | memoryview) -> ShmRef:
        """Copies `data` after the previous chunk; returns where it lies. Called by the thread
        feeding the push. Raises CANCELLED once the transfer's writer was closed."""
        ...


def valid_transfer_id(transfer_id: str) -> bool:
    """Whether `transfer_id` may name a segment or stamp a pool region."""
    return _TRANSFER_ID_RE.match(transfer_id) is not None


def pool_segment_name() -> str:
    """A fresh pool segment name owned by this process."""
    return f"pdkvpool-{os.getpid()}-{secrets.token_hex(8)}"


# A transfer segment untouched this long belongs to a transfer whose both ends died.
STALE_SEGMENT_AGE_S = 600.0
_SWEEP_EVERY_S = 60.0
_last_sweep = 0.0


def sweep_stale_segments(force: bool = False) -> int:
    """Unlinks transfer segments older than STALE_SEGMENT_AGE_S and pool segments whose owner
    process is gone (at most once a minute per process unless `force`); returns how many. The
    one path the ends cannot clean: both died mid-transfer, or a sender died with its pool.
    Pool owners are judged by pid, so senders and receivers must share a pid namespace (as
    replicas of one node do under Ray)."""
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
    for path in SHM_DIR.glob("pdkvpool-*"):
        if _pool_owner_gone(path.name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def _pool_owner_gone(name: str) -> bool:
    match = POOL_NAME_RE.match(name)
    if match is None:
        return False
    pid = int(match.group("pid"))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def create_segment(name: str, num_bytes: int) -> int:
    """Creates `SHM_DIR/name` (mode 0600, must not exist) with `num_bytes` allocated; returns
    its fd, open read-write. Raises TransferUnavailable (no /dev/shm, or no room in it)."""
    if not shm_available():
        raise TransferUnavailable(f"the shm transport needs a writable {SHM_DIR}")
    path = SHM_DIR / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, num_bytes)
        os.posix_fallocate(fd, 0, num_bytes)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise TransferUnavailable(
            f"cannot allocate {num_bytes} bytes in {SHM_DIR}: {exc.strerror}"
        ) from None
    return fd


def check_peer_segment(name: str, fd: int, min_bytes: int, max_bytes: int) -> os.stat_result:
    """Checks a segment a peer named before mapping it: a regular file of this user, of a size
    in [min_bytes, max_bytes]. Raises DATA_LOSS."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise TransferDataLoss(f"segment {name}: not a regular file of this user")
    if not min_bytes <= info.st_size <= max_bytes:
        raise TransferDataLoss(
            f"segment {name}: {info.st_size} bytes, expected [{min_bytes}, {max_bytes}]"
        )
    return info


class ShmSegmentWriter:
    """One transfer's own segment on the sender side. `append` runs on the thread feeding the
    push, `close` on the sending thread: a lock keeps a late append out of a closed segment."""

    def __init__(self, transfer_id: str, num_bytes: int) -> None:
        sweep_stale_segments()
        if not valid_transfer_id(transfer_id):
            raise TransferDataLoss(f"transfer id {transfer_id!r} cannot name a segment")
        self.name = f"pdkv-{transfer_id}-{secrets.token_hex(4)}"
        self._path = SHM_DIR / self.name
        fd = create_segment(self.name, num_bytes)
        try:
            self._map = mmap.mmap(fd, num_bytes)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self._offset = 0
        self._lock = threading.Lock()

    def append(self, data: bytes | memoryview) -> ShmRef:
        """Copies `data` after the previous chunk; returns where it lies."""
        view = memoryview(data).cast("B")
        with self._lock:
            if self._map.closed:
                raise TransferCancelled(f"segment {self.name}: the transfer has ended")
            end = self._offset + view.nbytes
            if end > len(self._map):
                raise TransferDataLoss(f"segment {self.name}: chunk past the end of the segment")
            self._map[self._offset : end] = view
            ref = ShmRef(self.name, self._offset, view.nbytes)
            self._offset = end
        return ref

    def close(self) -> None:
        """Unmaps and unlinks; idempotent."""
        with self._lock:
            if not self._map.closed:
                self._map.close()
        self.unlink()

    def unlink(self) -> None:
        # The receiver may have unlinked it first.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


class ShmSegmentReader:
    """One transfer's own segment on the receiver side, mapped read-only on first use."""

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
        if ref.offset < 0 or ref.length < 0 or ref.offset + ref.length > len(self._map):
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
            fd = os.open(SHM_DIR / name, PEER_OPEN_FLAGS)
        except OSError as exc:
            raise TransferDataLoss(f"segment {name}: cannot open ({exc.strerror})") from None
        try:
            size = self._expected_bytes
            check_peer_segment(name, fd, size, size)
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._name = name
