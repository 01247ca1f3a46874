"""The ownership protocol of a pool region, shared by the sender (kvtransfer/shm_pool.py) and
the receiver (kvtransfer/shm_reader.py).

A sender leases a region of its pool segment per transfer. The region starts with a stamp
(STAMP_BYTES, naming the transfer and its size) and the chunks follow it. The sender cannot
tell from the control stream alone when a receiver has stopped reading (a cancelled call ends
at once on the sender, while the receiver may still be copying a chunk), so the two processes
meet on an open-file-description byte-range lock over the region:

- the receiver takes a shared lock on the region at its first chunk, then checks the stamp,
  and holds the lock until its push is over (closing the file releases it, also when the
  receiver process dies);
- when its transfer ends on any path, the sender tries an exclusive lock: if it gets it, no
  receiver is reading, so it wipes the stamp, unlocks and reuses the region; if not, the region
  is quarantined and tried again later.

A receiver that comes late (after the wipe) finds no stamp, or another transfer's, and fails
with DATA_LOSS instead of reading bytes that are no longer its own. Open-file-description
locks (not process-wide POSIX locks) conflict between two descriptions of one process too, so
a sender and a receiver in the same process behave the same.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import struct

from kvtransfer.shm_segment import valid_transfer_id

# Bytes reserved before each region's first chunk for its stamp; regions start at multiples of
# it, so chunk data is page-aligned too.
STAMP_BYTES = 4096
_MAGIC = b"pdkvrgn1"
# magic, payload bytes of the transfer, length of the transfer id; the id follows.
_STAMP_HEAD = struct.Struct("<8sQH")
_MAX_ID_BYTES = 64
STAMP_USED_BYTES = _STAMP_HEAD.size + _MAX_ID_BYTES
WIPED_STAMP = bytes(STAMP_USED_BYTES)

OFD_LOCKS_AVAILABLE = hasattr(fcntl, "F_OFD_SETLK")


class _Flock(ctypes.Structure):
    """struct flock (Linux); ctypes lays out the padding the kernel expects."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


def encode_stamp(transfer_id: str, num_bytes: int) -> bytes:
    """The stamp of a region leased for `transfer_id` carrying `num_bytes` payload bytes."""
    if not valid_transfer_id(transfer_id):
        raise ValueError(f"transfer id {transfer_id!r} cannot stamp a region")
    raw_id = transfer_id.encode("ascii")
    return _STAMP_HEAD.pack(_MAGIC, num_bytes, len(raw_id)) + raw_id


def stamp_matches(stamp: bytes | memoryview, transfer_id: str, num_bytes: int) -> bool:
    """Whether `stamp` (the region's first STAMP_USED_BYTES) names this transfer and size."""
    if len(stamp) < STAMP_USED_BYTES:
        return False
    magic, stamped_bytes, id_length = _STAMP_HEAD.unpack_from(stamp)
    if magic != _MAGIC or stamped_bytes != num_bytes or id_length > _MAX_ID_BYTES:
        return False
    start = _STAMP_HEAD.size
    return bytes(stamp[start : start + id_length]) == transfer_id.encode("ascii", "replace")


def try_lock(fd: int, start: int, length: int, exclusive: bool) -> bool:
    """Takes a shared (or exclusive) lock on bytes [start, start + length) of `fd`'s open
    file description without blocking; False when a conflicting lock is held. Never blocks.
    Raises OSError for anything else (e.g. an fd not open for writing asked for `exclusive`)."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    return _set_lock(fd, kind, start, length)


def unlock(fd: int, start: int, length: int) -> None:
    """Releases this description's lock on [start, start + length)."""
    _set_lock(fd, fcntl.F_UNLCK, start, length)


def _set_lock(fd: int, kind: int, start: int, length: int) -> bool:
    # l_pid must be 0 for open-file-description locks.
    request = bytes(_Flock(kind, 0, start, length, 0))
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
