"""The same-node shm transport: bytes through a /dev/shm segment, control over gRPC; the
segment is gone after every outcome, and a receiver refuses segments it should not read."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtransfer import KVReceiver, TransferError, make_receiver, make_sender
from kvtransfer.shm_segment import (
    SHM_DIR,
    STALE_SEGMENT_AGE_S,
    ShmRef,
    ShmSegmentReader,
    ShmSegmentWriter,
    sweep_stale_segments,
)
from pdserve.errors import StatusCode
from tests.unit.test_kv_grpc_transport import (
    CONFIG,
    LAYOUT,
    NUM_TOKENS,
    ArraySink,
    ArraySource,
    DoneRecorder,
    send,
)


def segments(transfer_id: str) -> set[Path]:
    """This test's segments (other processes on the machine may be moving KV too)."""
    return set(SHM_DIR.glob(f"pdkv-{transfer_id}-*"))


@pytest.fixture
def receiver() -> Iterator[KVReceiver]:
    receiver = make_receiver("auto", LAYOUT, CONFIG)  # "auto" accepts inline and shm chunks
    receiver.start()
    yield receiver
    receiver.stop()


def test_shm_round_trip_leaves_no_segment(receiver: KVReceiver) -> None:
    sender = make_sender("shm", CONFIG)
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("t1", NUM_TOKENS, sink, done)
    stats = send(sender, receiver, "t1", source)
    assert stats.transport == "shm"  # type: ignore[attr-defined]
    assert done.wait().ok
    assert (sink.keys == source.keys).all() and (sink.values == source.values).all()
    assert not segments("t1")
    sender.close()


def test_failed_shm_transfer_leaves_no_segment(receiver: KVReceiver) -> None:
    sender = make_sender("shm", CONFIG)
    receiver.expect("t2", NUM_TOKENS + 1, ArraySink(LAYOUT, NUM_TOKENS + 1), DoneRecorder())
    with pytest.raises(TransferError) as caught:
        send(sender, receiver, "t2", ArraySource(LAYOUT, NUM_TOKENS))
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert not segments("t2")
    receiver.cancel("t2")
    sender.close()


def test_grpc_only_receiver_refuses_shm_chunks() -> None:
    receiver = make_receiver("grpc", LAYOUT, CONFIG)
    receiver.start()
    sender = make_sender("shm", CONFIG)
    done = DoneRecorder()
    receiver.expect("t3", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), done)
    with pytest.raises(TransferError) as caught:
        send(sender, receiver, "t3", ArraySource(LAYOUT, NUM_TOKENS))
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert "shm" in caught.value.message
    assert not done.wait().ok
    sender.close()
    receiver.stop()


def test_reader_refuses_foreign_missing_and_resized_segments() -> None:
    size = LAYOUT.kv_bytes(NUM_TOKENS)
    writer = ShmSegmentWriter("abc", size)
    ref = writer.append(b"\x01" * 64)
    try:
        with pytest.raises(TransferError, match="does not belong"):
            ShmSegmentReader("other", size).view(ref)
        with pytest.raises(TransferError, match="does not belong"):
            ShmSegmentReader("abc", size).view(ShmRef("../etc/passwd", 0, 64))
        with pytest.raises(TransferError, match="expected"):
            ShmSegmentReader("abc", size + 1).view(ref)
        with pytest.raises(TransferError, match="past its end"):
            ShmSegmentReader("abc", size).view(ShmRef(ref.segment, size - 8, 64))
        view = ShmSegmentReader("abc", size).view(ref)
        assert bytes(view) == b"\x01" * 64
        view.release()
    finally:
        writer.close()
    with pytest.raises(TransferError, match="cannot open"):
        ShmSegmentReader("abc", size).view(ref)


def test_stale_segments_of_dead_transfers_are_swept() -> None:
    stale = ShmSegmentWriter("stale", 64)
    fresh = ShmSegmentWriter("fresh", 64)
    try:
        old = time.time() - STALE_SEGMENT_AGE_S - 5
        os.utime(SHM_DIR / stale.name, (old, old))
        assert sweep_stale_segments(force=True) >= 1
        assert not (SHM_DIR / stale.name).exists()
        assert (SHM_DIR / fresh.name).exists()
    finally:
        stale.close()
        fresh.close()
