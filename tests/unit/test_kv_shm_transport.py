"""The same-node shm transport end to end: bytes through /dev/shm, control over gRPC. A pool
region comes back after every outcome (never while the receiver still reads it), a segment of
a transfer's own is gone after every outcome, and a receiver refuses segments it should not
read."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtransfer import (
    ChunkSpec,
    KVReceiver,
    KVSender,
    TransferError,
    make_receiver,
    make_sender,
    plan_chunks,
)
from kvtransfer.faults import ChunkFault
from kvtransfer.shm_region import STAMP_BYTES
from kvtransfer.shm_segment import (
    SHM_DIR,
    STALE_SEGMENT_AGE_S,
    ShmRef,
    ShmSegmentReader,
    ShmSegmentWriter,
    sweep_stale_segments,
)
from kvtransfer.shm_staging import ShmStaging
from pdserve.errors import StatusCode
from tests.unit.test_kv_grpc_transport import (
    CONFIG,
    LAYOUT,
    NUM_TOKENS,
    WAIT_S,
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


# With a pool: 1 MiB holds about twenty transfers of this test's size.
POOL_CONFIG = CONFIG.model_copy(update={"shm_pool_mb": 1})


@pytest.fixture
def pool_sender() -> Iterator[KVSender]:
    sender = make_sender("shm", POOL_CONFIG)
    yield sender
    sender.close()


def staging(sender: KVSender) -> ShmStaging:
    staged = getattr(sender, "shm_staging", None)
    assert isinstance(staged, ShmStaging), "an shm sender has its staging"
    return staged


def all_returned(sender: KVSender) -> bool:
    stats = staging(sender).stats()
    return stats.num_active_leases == 0 and stats.pool_free_bytes == stats.pool_bytes


def wait_until(condition: Callable[[], bool]) -> bool:
    """Polls `condition` (a receiver thread finishes on its own time) for at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def times_mapped(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f"/{name}" in line)


def pool_name(sender: KVSender) -> str:
    pool = staging(sender)._pool
    assert pool is not None
    return pool.name


def in_thread(run: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


def test_pool_round_trip_is_bit_identical_and_mapped_once(
    pool_sender: KVSender, receiver: KVReceiver
) -> None:
    for transfer_id in ("p1", "p2"):
        source, sink, done = ArraySource(LAYOUT, NUM_TOKENS, seed=len(transfer_id)), \
            ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()
        receiver.expect(transfer_id, NUM_TOKENS, sink, done)
        send(pool_sender, receiver, transfer_id, source)
        assert done.wait().ok
        assert (sink.keys == source.keys).all() and (sink.values == source.values).all()
        assert not segments(transfer_id)
        assert all_returned(pool_sender)  # the ack came after the receiver let go: no wait
    stats = staging(pool_sender).stats()
    assert stats.num_pool_transfers == 2 and stats.num_fallback_transfers == 0
    assert times_mapped(pool_name(pool_sender)) == 2  # the sender's and the receiver's, once


def _commit(sender: KVSender, receiver: KVReceiver) -> None:
    receiver.expect("t1", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
    send(sender, receiver, "t1", ArraySource(LAYOUT, NUM_TOKENS))


def _receiver_refuses(sender: KVSender, receiver: KVReceiver) -> None:
    receiver.expect("t1", NUM_TOKENS + 1, ArraySink(LAYOUT, NUM_TOKENS + 1), DoneRecorder())
    send(sender, receiver, "t1", ArraySource(LAYOUT, NUM_TOKENS))


def _corrupt_chunk(sender: KVSender, receiver: KVReceiver) -> None:
    receiver.expect("t1", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
    send(sender, receiver, "t1", ArraySource(LAYOUT, NUM_TOKENS), fault=ChunkFault("corrupt", 1))


def _source_fails(sender: KVSender, receiver: KVReceiver) -> None:
    class FailingSource(ArraySource):
        def read(self, chunk: ChunkSpec) -> memoryview:
            if chunk.seq == 2:
                raise RuntimeError("lease expired")
            return super().read(chunk)

    receiver.expect("t1", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
    send(sender, receiver, "t1", FailingSource(LAYOUT, NUM_TOKENS))


def _deadline(sender: KVSender, receiver: KVReceiver) -> None:
    source = ArraySource(LAYOUT, NUM_TOKENS)
    source.gate_seq = 2
    receiver.expect("t1", NUM_TOKENS, ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder())
    try:
        send(sender, receiver, "t1", source, timeout_s=0.5)
    finally:
        source.gate.set()


def _stopped_mid_push(by_receiver: bool) -> Callable[[KVSender, KVReceiver], None]:
    def run(sender: KVSender, receiver: KVReceiver) -> None:
        source, sink = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS)
        source.gate_seq = 3
        receiver.expect("t1", NUM_TOKENS, sink, DoneRecorder())
        cancel = threading.Event()
        thread, errors = in_thread(lambda: send(sender, receiver, "t1", source, cancel=cancel))
        assert source.reached_gate.wait(WAIT_S) and sink.written.wait(WAIT_S)
        if by_receiver:
            receiver.cancel("t1")
        else:
            cancel.set()
        source.gate.set()
        thread.join(WAIT_S)
        raise errors[0]

    return run


@pytest.mark.parametrize(("end", "code"), [
    (_commit, None),
    (_receiver_refuses, StatusCode.FAILED_PRECONDITION),
    (_corrupt_chunk, StatusCode.DATA_LOSS),
    (_source_fails, StatusCode.INTERNAL),
    (_deadline, StatusCode.DEADLINE_EXCEEDED),
    (_stopped_mid_push(by_receiver=False), StatusCode.CANCELLED),
    (_stopped_mid_push(by_receiver=True), StatusCode.CANCELLED),
], ids=["commit", "refused", "corrupt", "source-error", "deadline", "sender-cancel",
        "receiver-cancel"])
def test_every_end_gives_the_region_back(
    pool_sender: KVSender, receiver: KVReceiver,
    end: Callable[[KVSender, KVReceiver], None], code: StatusCode | None,
) -> None:
    if code is None:
        end(pool_sender, receiver)
    else:
        with pytest.raises(TransferError) as caught:
            end(pool_sender, receiver)
        assert caught.value.code is code
    assert wait_until(lambda: all_returned(pool_sender) and receiver.num_pending == 0)
    _commit(pool_sender, receiver)  # the next transfer goes through the pool again
    stats = staging(pool_sender).stats()
    assert stats.num_pool_transfers == 2 and stats.num_fallback_transfers == 0


def test_region_is_held_while_the_receiver_still_copies(
    pool_sender: KVSender, receiver: KVReceiver
) -> None:
    class SlowSink(ArraySink):
        """Stays inside the write of chunk 1 until released."""

        entered, release = threading.Event(), threading.Event()

        def write(self, chunk: ChunkSpec, data: memoryview) -> None:
            if chunk.seq == 1:
                self.entered.set()
                assert self.release.wait(WAIT_S)
            super().write(chunk, data)

    source, sink = ArraySource(LAYOUT, NUM_TOKENS), SlowSink(LAYOUT, NUM_TOKENS)
    receiver.expect("t1", NUM_TOKENS, sink, DoneRecorder())
    cancel = threading.Event()
    thread, errors = in_thread(lambda: send(pool_sender, receiver, "t1", source, cancel=cancel))
    assert sink.entered.wait(WAIT_S)
    cancel.set()  # the sender gives up while the receiver is copying chunk 1
    thread.join(WAIT_S)
    assert isinstance(errors[0], TransferError) and errors[0].code is StatusCode.CANCELLED
    assert staging(pool_sender).stats().num_quarantined_regions == 1
    # Another transfer meanwhile gets another region: the one being read is not rewritten.
    source2, sink2, done2 = ArraySource(LAYOUT, NUM_TOKENS, seed=5), \
        ArraySink(LAYOUT, NUM_TOKENS), DoneRecorder()
    receiver.expect("t2", NUM_TOKENS, sink2, done2)
    send(pool_sender, receiver, "t2", source2)
    assert done2.wait().ok and (sink2.keys == source2.keys).all()
    sink.release.set()
    assert wait_until(lambda: sink.num_writes == 2)
    [_, spec] = plan_chunks(LAYOUT, NUM_TOKENS, CONFIG.chunk_bytes)[:2]
    block = np.s_[spec.layer_start : spec.layer_end, spec.token_start : spec.token_end]
    assert (sink.keys[block] == source.keys[block]).all()  # what it read was still t1's
    assert wait_until(lambda: all_returned(pool_sender))


def test_full_pool_falls_back_to_a_segment_of_its_own(
    pool_sender: KVSender, receiver: KVReceiver
) -> None:
    staged = staging(pool_sender)
    assert staged.wait_ready(WAIT_S)
    with staged.writer("hold", staged.stats().pool_bytes - STAMP_BYTES):
        source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
            DoneRecorder()
        receiver.expect("f1", NUM_TOKENS, sink, done)
        send(pool_sender, receiver, "f1", source)
    assert done.wait().ok and (sink.values == source.values).all()
    assert staged.stats().num_fallback_transfers == 1 and not segments("f1")


def test_pool_off_still_moves_every_byte(receiver: KVReceiver) -> None:
    sender = make_sender("shm", CONFIG.model_copy(update={"shm_pool_mb": 0}))
    pools_before = set(SHM_DIR.glob(f"pdkvpool-{os.getpid()}-*"))
    source, sink, done = ArraySource(LAYOUT, NUM_TOKENS), ArraySink(LAYOUT, NUM_TOKENS), \
        DoneRecorder()
    receiver.expect("o1", NUM_TOKENS, sink, done)
    send(sender, receiver, "o1", source)
    assert done.wait().ok and (sink.keys == source.keys).all()
    assert set(SHM_DIR.glob(f"pdkvpool-{os.getpid()}-*")) == pools_before
    assert not segments("o1") and staging(sender).stats().num_fallback_transfers == 0
    sender.close()


def test_shutdown_removes_the_pool_and_its_mappings() -> None:
    receiver = make_receiver("shm", LAYOUT, CONFIG)
    receiver.start()
    sender = make_sender("shm", POOL_CONFIG)
    _commit(sender, receiver)
    name = pool_name(sender)
    assert (SHM_DIR / name).exists() and times_mapped(name) == 2
    sender.close()
    assert not (SHM_DIR / name).exists() and times_mapped(name) == 1
    receiver.stop()
    assert times_mapped(name) == 0
