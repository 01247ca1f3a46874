"""The sender's shm pool and the receiver's mappings, without gRPC: region allocation, leases
and their end, the region lock that keeps a region from being reused under a reader, the loud
fallback, the bounded and validated mapping cache, and the sweep of dead owners' pools."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kvtransfer import TransferError
from kvtransfer import shm_mappings as mappings_module
from kvtransfer import shm_staging as staging_module
from kvtransfer.errors import TransferUnavailable
from kvtransfer.shm_mappings import ShmMappingCache
from kvtransfer.shm_pool import ShmPool
from kvtransfer.shm_reader import PoolRegionReader, open_shm_reader
from kvtransfer.shm_region import STAMP_BYTES
from kvtransfer.shm_regions import RegionAllocator
from kvtransfer.shm_segment import (
    SHM_DIR,
    STALE_SEGMENT_AGE_S,
    ShmRef,
    ShmSegmentWriter,
    sweep_stale_segments,
)
from kvtransfer.shm_staging import MIB, ShmStaging
from pdserve.errors import StatusCode

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def pool() -> Iterator[ShmPool]:
    pool = ShmPool(MIB)
    yield pool
    pool.close()


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def times_mapped(name: str) -> int:
    """How many mappings of segment `name` this process has (sender's and receiver's)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f"/{name}" in line)


def span(first: ShmRef, num_bytes: int) -> tuple[int, int]:
    return first.offset - STAMP_BYTES, first.offset + num_bytes


def test_allocator_first_fit_coalesces_and_refuses_double_free() -> None:
    regions = RegionAllocator(16 * 4096, 4096)
    a, b, c = regions.allocate(1), regions.allocate(4097), regions.allocate(4096)
    assert (a, b, c) == (0, 4096, 3 * 4096)
    assert regions.allocate(13 * 4096) is None and regions.free_bytes == 12 * 4096
    regions.free(4096, 4097)
    assert regions.allocate(2 * 4096) == 4096  # the hole is reused first
    regions.free(4096, 8192)
    regions.free(0, 1)
    regions.free(3 * 4096, 4096)
    assert regions.free_bytes == 16 * 4096 and regions.allocate(16 * 4096) == 0
    regions.free(0, 16 * 4096)
    with pytest.raises(ValueError):
        regions.free(0, 4096)


def test_lease_appends_inside_its_region_and_ends_once(pool: ShmPool) -> None:
    lease = pool.try_lease("t1", 2 * len(PAYLOAD))
    assert lease is not None
    first, second = lease.append(PAYLOAD), lease.append(PAYLOAD)
    assert first.segment == pool.name and second.offset == first.offset + len(PAYLOAD)
    assert first.offset % STAMP_BYTES == 0 and first.offset >= STAMP_BYTES
    with pytest.raises(TransferError, match="past the leased region"):
        lease.append(b"x")
    assert pool.stats().num_active_leases == 1
    lease.close()
    lease.close()
    stats = pool.stats()
    assert stats.num_free_bytes == pool.num_bytes and stats.num_active_leases == 0
    with pytest.raises(TransferError) as caught:
        lease.append(PAYLOAD)  # a late append from the feeder thread never lands
    assert caught.value.code is StatusCode.CANCELLED


def test_reader_round_trip_bytes_are_identical(pool: ShmPool) -> None:
    lease = pool.try_lease("t1", 2 * len(PAYLOAD))
    assert lease is not None
    refs = [lease.append(PAYLOAD), lease.append(PAYLOAD[::-1])]
    reader = open_shm_reader("t1", 2 * len(PAYLOAD), refs[0], ShmMappingCache())
    assert isinstance(reader, PoolRegionReader)
    views = [reader.view(ref) for ref in refs]
    assert bytes(views[0]) == PAYLOAD and bytes(views[1]) == PAYLOAD[::-1]
    for view in views:
        view.release()
    reader.close()
    lease.close()


def test_region_is_not_reused_while_a_receiver_reads_it(pool: ShmPool) -> None:
    size = pool.num_bytes // 2  # two regions cannot both be this size plus a stamp
    lease = pool.try_lease("t1", size)
    assert lease is not None
    first = lease.append(PAYLOAD)
    reader = open_shm_reader("t1", size, first, ShmMappingCache())
    reader.view(first).release()  # the receiver is inside the transfer: it holds the region
    lease.close()  # the sender gave up (cancel, deadline, failure)
    assert pool.stats().num_quarantined_regions == 1
    other = pool.try_lease("t2", size)
    if other is not None:
        assert not overlaps(span(other.append(PAYLOAD), size), span(first, size))
        other.close()
    assert pool.try_lease("t3", pool.num_bytes - STAMP_BYTES) is None
    reader.close()  # the receiver's push is over: the region comes back
    assert pool.reclaim() == 0
    whole = pool.try_lease("t3", pool.num_bytes - STAMP_BYTES)
    assert whole is not None
    whole.close()
    assert pool.stats().num_deferred_reclaims == 1


def test_a_late_receiver_never_reads_a_reclaimed_region(pool: ShmPool) -> None:
    lease = pool.try_lease("t1", len(PAYLOAD))
    assert lease is not None
    first = lease.append(PAYLOAD)
    lease.close()  # ended before the receiver got to its first chunk
    with pytest.raises(TransferError, match="not leased to transfer t1") as caught:
        open_shm_reader("t1", len(PAYLOAD), first, None).view(first)
    assert caught.value.code is StatusCode.DATA_LOSS
    reused = pool.try_lease("t2", len(PAYLOAD))
    assert reused is not None and reused.append(PAYLOAD).offset == first.offset
    late = open_shm_reader("t1", len(PAYLOAD), first, None)
    with pytest.raises(TransferError, match="not leased to transfer t1"):
        late.view(first)
    late.close()
    reused.close()
    assert pool.stats().num_quarantined_regions == 0


def test_reader_refuses_ranges_outside_its_region(pool: ShmPool) -> None:
    lease = pool.try_lease("t1", 2 * len(PAYLOAD))
    assert lease is not None
    first = lease.append(PAYLOAD)
    reader = open_shm_reader("t1", 2 * len(PAYLOAD), first, None)
    reader.view(first).release()
    bad = [
        ShmRef(pool.name, first.offset - 1, 1),  # into the stamp
        ShmRef(pool.name, first.offset + len(PAYLOAD), 2 * len(PAYLOAD)),  # past the region
        ShmRef(pool.name, -5, 10),
    ]
    for ref in bad:
        with pytest.raises(TransferError, match="outside the transfer's region"):
            reader.view(ref)
    reader.close()
    for ref in (ShmRef(pool.name, 100, 8), ShmRef(pool.name, pool.num_bytes, 8)):
        with pytest.raises(TransferError, match="does not start a region|past its end"):
            open_shm_reader("t1", 8, ref, None).view(ref)
    lease.close()


def test_mapping_cache_validates_names_before_opening() -> None:
    cache = ShmMappingCache()
    pid = os.getpid()
    for name in ("../etc/passwd", f"pdkvpool-{pid}-xyz", "pdkv-t-00000000", f"pdkvpool-{pid}-"
                 + "0" * 15 + "/x"):
        with pytest.raises(TransferError, match="not a pool segment"):
            cache.open(name)
    fifo, link, odd = (f"pdkvpool-{pid}-{n:016x}" for n in (1, 2, 3))
    os.mkfifo(SHM_DIR / fifo, 0o600)
    os.symlink("/etc/hostname", SHM_DIR / link)
    fd = os.open(SHM_DIR / odd, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, STAMP_BYTES + 1)
    os.close(fd)
    try:
        with pytest.raises(TransferError, match="not a regular file"):
            cache.open(fifo)  # and it did not block waiting for a writer
        with pytest.raises(TransferError, match="cannot open"):
            cache.open(link)
        with pytest.raises(TransferError, match="not whole pages"):
            cache.open(odd)
        with pytest.raises(TransferError, match="cannot open"):
            cache.open(f"pdkvpool-{pid}-{4:016x}")
    finally:
        for name in (fifo, link, odd):
            os.unlink(SHM_DIR / name)
    assert cache.num_mapped == 0


def test_mapping_cache_maps_each_segment_once_and_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pools = [ShmPool(64 * 1024) for _ in range(4)]
    cache = ShmMappingCache(max_idle=2)
    try:
        for _ in range(2):
            for pool in pools:
                fd, mapping = cache.open(pool.name)
                os.close(fd)
                cache.release(mapping)
                assert cache.num_mapped <= 2
        assert cache.num_maps == 8  # LRU of 2 over 4 senders: every open remaps
        fd, mapping = cache.open(pools[3].name)
        os.close(fd)
        cache.release(mapping)
        assert cache.num_maps == 8  # the most recent one is still mapped
        monkeypatch.setattr(mappings_module, "_PRUNE_EVERY_S", 0.0)
        pools[3].close()  # its sender is gone: the next open drops the idle mapping
        assert times_mapped(pools[3].name) == 1  # by the cache only, now
        fd, mapping = cache.open(pools[0].name)
        os.close(fd)
        assert times_mapped(pools[3].name) == 0 and cache.num_mapped == 2
        cache.release(mapping)
    finally:
        cache.close()
        for pool in pools:
            pool.close()


def test_staging_falls_back_loudly_when_the_pool_cannot_hold_a_transfer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    staging = ShmStaging(pool_mb=1)
    caplog.set_level(logging.WARNING, logger=staging_module.__name__)
    try:
        with staging.writer("big1", 2 * MIB) as writer:
            assert isinstance(writer, ShmSegmentWriter)
        with pytest.raises(TransferError) as caught:
            writer.append(PAYLOAD)  # the transfer is over: a late append never lands
        assert caught.value.code is StatusCode.CANCELLED
        with staging.writer("held", MIB // 2), staging.writer("busy", MIB // 2) as writer:
            assert isinstance(writer, ShmSegmentWriter)  # the pool is full: fall back
        with staging.writer("big2", 2 * MIB):
            pass
        with staging.writer("fits", MIB // 2) as writer:
            assert not isinstance(writer, ShmSegmentWriter)
        stats = staging.stats()
        assert stats.num_fallback_transfers == 3 and stats.num_pool_transfers == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2  # once per reason, not once per transfer
        assert "larger than the pool" in warnings[0] and "pool full" in warnings[1]
        assert not list(SHM_DIR.glob("pdkv-big*-*"))
    finally:
        staging.close()


def test_staging_without_a_pool(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger=staging_module.__name__)
    off = ShmStaging(pool_mb=0)
    with off.writer("off", 4096) as writer:
        assert isinstance(writer, ShmSegmentWriter)
    assert off.stats().num_fallback_transfers == 0 and not caplog.records  # configured, quiet

    def no_pool(num_bytes: int) -> ShmPool:
        raise TransferUnavailable("no room")

    monkeypatch.setattr(staging_module, "ShmPool", no_pool)
    broken = ShmStaging(pool_mb=1)
    with broken.writer("broken", 4096) as writer:
        assert isinstance(writer, ShmSegmentWriter)
    assert broken.stats().num_fallback_transfers == 1
    assert any("cannot create the shm pool" in r.getMessage() for r in caplog.records)


def test_close_unlinks_the_pool_and_sweep_removes_dead_owners_only() -> None:
    pool = ShmPool(64 * 1024)
    path = SHM_DIR / pool.name
    old = time.time() - STALE_SEGMENT_AGE_S - 5
    os.utime(path, (old, old))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = SHM_DIR / f"pdkvpool-{int(child.stdout)}-{os.urandom(8).hex()}"
    alive = SHM_DIR / f"pdkvpool-{os.getppid()}-{os.urandom(8).hex()}"
    for orphan in (dead, alive):
        orphan.write_bytes(b"")
    try:
        assert sweep_stale_segments(force=True) >= 1
        assert not dead.exists() and alive.exists()
        assert path.exists()  # a live owner's pool stays, however old its mtime
        lease = pool.try_lease("t1", 16)
        assert lease is not None
        pool.close()
        assert not path.exists()
        lease.append(b"still writable!!")  # until its lease ends
        lease.close()
        with pytest.raises(TransferError):
            pool.try_lease("t2", 16)
    finally:
        alive.unlink()
        pool.close()
