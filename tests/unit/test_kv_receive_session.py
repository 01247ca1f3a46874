"""The receiver's stream validation, driven directly (no transport)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

from kvtransfer import ChunkSpec, KVLayout, TransferError, TransferResult, plan_chunks
from kvtransfer.checksum import checksum
from kvtransfer.errors import TransferCancelled
from kvtransfer.receive_session import ReceiveSession
from kvtransfer.stream import Chunk, Commit, Header, Message, outgoing_messages
from kvtransfer.transfer_table import Expectation, TransferTable
from pdserve.errors import StatusCode

LAYOUT = KVLayout("fp", num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32")
NUM_TOKENS = 7
# One token row is 64 bytes: 3 rows per chunk splits each layer into 3 chunks (9 in all).
CHUNK_BYTES = 3 * LAYOUT.token_row_bytes


class BytesSource:
    """Random KV bytes, served per chunk exactly as the wire format lays them out."""

    def __init__(self, layout: KVLayout, num_tokens: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.layout = layout
        self.num_tokens = num_tokens
        row = layout.token_row_bytes // 2
        # keys[layer][token] and values[layer][token]: one row of heads x dim each.
        shape = range(layout.num_layers), range(num_tokens)
        self.keys = [[rng.randbytes(row) for _ in shape[1]] for _ in shape[0]]
        self.values = [[rng.randbytes(row) for _ in shape[1]] for _ in shape[0]]

    def read(self, chunk: ChunkSpec) -> bytes:
        layers = range(chunk.layer_start, chunk.layer_end)
        tokens = range(chunk.token_start, chunk.token_end)
        keys = b"".join(self.keys[lay][tok] for lay in layers for tok in tokens)
        values = b"".join(self.values[lay][tok] for lay in layers for tok in tokens)
        return keys + values


class RecordingSink:
    def __init__(self) -> None:
        self.writes: list[tuple[ChunkSpec, bytes]] = []

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        self.writes.append((chunk, bytes(data)))


class Receiver:
    """A TransferTable with one expected transfer and a record of its on_done calls."""

    def __init__(self, transfer_id: str = "t1", num_tokens: int = NUM_TOKENS) -> None:
        self.table = TransferTable()
        self.sink = RecordingSink()
        self.results: list[TransferResult] = []
        self.table.expect(Expectation(transfer_id, num_tokens, self.sink, self.results.append))
        self.num_aborts = 0

    def session(self) -> ReceiveSession:
        def abort() -> None:
            self.num_aborts += 1

        return ReceiveSession(self.table, LAYOUT, abort)

    def run(self, messages: list[Message], *, end: bool = True) -> int:
        session = self.session()
        for message in messages:
            session.handle(message)
        return session.end() if end else -1


def good_stream(
    transfer_id: str = "t1", num_tokens: int = NUM_TOKENS, layout: KVLayout = LAYOUT
) -> list[Message]:
    """A valid stream, except that its header announces `layout`."""
    source = BytesSource(LAYOUT, num_tokens)
    chunks = plan_chunks(LAYOUT, num_tokens, CHUNK_BYTES)
    header = Header(transfer_id, LAYOUT, num_tokens, len(chunks))
    messages = list(outgoing_messages(header, chunks, source, 42, lambda: False))
    return [dataclasses.replace(header, layout=layout), *messages[1:]]


def test_good_stream_is_written_and_reported() -> None:
    receiver = Receiver()
    messages = good_stream()
    num_bytes = receiver.run(messages)
    assert num_bytes == LAYOUT.kv_bytes(NUM_TOKENS)
    sent = [(m.spec, bytes(m.data)) for m in messages if isinstance(m, Chunk)]
    assert receiver.sink.writes == sent
    assert len(sent) == 9
    [result] = receiver.results
    assert result.ok and result.error is None
    assert (result.transfer_id, result.first_token_id, result.num_bytes) == ("t1", 42, num_bytes)
    assert receiver.table.num_pending == 0
    assert receiver.table.num_bytes_written == num_bytes


def _chunk_indices(messages: list[Message]) -> list[int]:
    return [i for i, m in enumerate(messages) if isinstance(m, Chunk)]


def _corrupt_crc(messages: list[Message]) -> list[Message]:
    i = _chunk_indices(messages)[2]
    chunk = messages[i]
    assert isinstance(chunk, Chunk)
    data = bytearray(chunk.data)
    data[5] ^= 0x01
    return [*messages[:i], dataclasses.replace(chunk, data=bytes(data)), *messages[i + 1:]]


def _drop_chunk(messages: list[Message]) -> list[Message]:
    i = _chunk_indices(messages)[4]
    return messages[:i] + messages[i + 1:]


def _swap_chunks(messages: list[Message]) -> list[Message]:
    i, j = _chunk_indices(messages)[1:3]
    out = list(messages)
    out[i], out[j] = out[j], out[i]
    return out


def _duplicate_chunk(messages: list[Message]) -> list[Message]:
    i = _chunk_indices(messages)[3]
    return messages[: i + 1] + [messages[i]] + messages[i + 1:]


def _renumbered(chunks: list[Message]) -> list[Message]:
    """Chunks with seq fixed up, so only their positions are wrong."""
    out: list[Message] = []
    for seq, message in enumerate(chunks):
        assert isinstance(message, Chunk)
        out.append(dataclasses.replace(message, spec=dataclasses.replace(message.spec, seq=seq)))
    return out


def _swap_renumbered(messages: list[Message]) -> list[Message]:
    chunks = [messages[i] for i in _chunk_indices(messages)]
    chunks[1], chunks[2] = chunks[2], chunks[1]
    return [messages[0], *_renumbered(chunks), messages[-1]]


def _overlap(messages: list[Message]) -> list[Message]:
    # The second chunk re-sends tokens the first one already covered.
    chunks = [messages[i] for i in _chunk_indices(messages)]
    second = chunks[1]
    assert isinstance(second, Chunk)
    spec = dataclasses.replace(second.spec, token_start=second.spec.token_start - 1)
    source = BytesSource(LAYOUT, NUM_TOKENS)
    data = source.read(spec)
    chunks[1] = Chunk(spec=spec, crc32c=checksum(data), data=data)
    return [messages[0], *chunks, messages[-1]]


def _truncate_data(messages: list[Message]) -> list[Message]:
    i = _chunk_indices(messages)[0]
    chunk = messages[i]
    assert isinstance(chunk, Chunk)
    data = bytes(chunk.data)[:-4]
    short = dataclasses.replace(chunk, data=data, crc32c=checksum(data))
    return [*messages[:i], short, *messages[i + 1:]]


def _wrong_commit_count(messages: list[Message]) -> list[Message]:
    commit = messages[-1]
    assert isinstance(commit, Commit)
    return [*messages[:-1], dataclasses.replace(commit, num_chunks=commit.num_chunks + 1)]


def _after_commit(messages: list[Message]) -> list[Message]:
    return [*messages, messages[1]]


def _second_header(messages: list[Message]) -> list[Message]:
    return [messages[0], messages[0], *messages[1:]]


def _chunk_first(messages: list[Message]) -> list[Message]:
    return messages[1:]


def _no_commit(messages: list[Message]) -> list[Message]:
    return messages[:-1]


@pytest.mark.parametrize(
    ("corrupt", "message_part", "num_good_writes"),
    [
        (_corrupt_crc, "crc32c mismatch", 2),
        (_drop_chunk, "chunk seq 5: expected 4", 4),
        (_swap_chunks, "chunk seq 2: expected 1", 1),
        (_duplicate_chunk, "chunk seq 3: expected 4", 4),
        (_swap_renumbered, "starts at layer 0 token 6, expected layer 0 token 3", 1),
        (_overlap, "starts at layer 0 token 2, expected layer 0 token 3", 1),
        (_truncate_data, "data bytes, expected", 0),
        (_wrong_commit_count, "commit num_chunks 10", 9),
        (_after_commit, "after the commit", 9),
        (_second_header, "second header", 0),
        (_no_commit, "ended before the commit", 9),
    ],
)
def test_invalid_stream_fails_with_data_loss(
    corrupt: Callable[[list[Message]], list[Message]], message_part: str, num_good_writes: int
) -> None:
    receiver = Receiver()
    with pytest.raises(TransferError) as caught:
        receiver.run(corrupt(good_stream()))
    assert caught.value.code is StatusCode.DATA_LOSS
    assert message_part in caught.value.message
    # Nothing past the first bad message reached the sink.
    assert len(receiver.sink.writes) == num_good_writes
    [result] = receiver.results
    assert not result.ok and result.error is not None
    assert result.error.code is StatusCode.DATA_LOSS
    _assert_serves_next_transfer(receiver)


def _assert_serves_next_transfer(receiver: Receiver) -> None:
    assert receiver.table.num_pending == 0
    sink = RecordingSink()
    results: list[TransferResult] = []
    receiver.table.expect(Expectation("t2", NUM_TOKENS, sink, results.append))
    session = receiver.session()
    for message in good_stream("t2"):
        session.handle(message)
    assert session.end() == LAYOUT.kv_bytes(NUM_TOKENS)
    assert [r.ok for r in results] == [True] and len(sink.writes) == 9
    assert receiver.table.num_pending == 0


def test_chunk_before_header_fails_without_claiming_a_transfer() -> None:
    receiver = Receiver()
    with pytest.raises(TransferError, match="must start with a header") as caught:
        receiver.run(_chunk_first(good_stream()))
    assert caught.value.code is StatusCode.DATA_LOSS
    # No header named the transfer, so it is still expected and was not reported.
    assert receiver.results == [] and receiver.table.num_pending == 1


def test_unknown_transfer_id_is_not_found_and_leaves_others_alone() -> None:
    receiver = Receiver()
    with pytest.raises(TransferError) as caught:
        receiver.run(good_stream("other"))
    assert caught.value.code is StatusCode.NOT_FOUND
    assert receiver.results == [] and receiver.sink.writes == []
    assert receiver.table.num_pending == 1
    receiver.run(good_stream("t1"))
    assert [r.ok for r in receiver.results] == [True]


def test_wrong_layout_fails_naming_the_field() -> None:
    receiver = Receiver()
    other = dataclasses.replace(LAYOUT, dtype="bfloat16")
    with pytest.raises(TransferError) as caught:
        receiver.run(good_stream(layout=other))
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert "dtype: sender bfloat16, receiver float32" in caught.value.message
    assert receiver.sink.writes == []
    [result] = receiver.results
    assert result.error is not None and result.error.code is StatusCode.FAILED_PRECONDITION
    _assert_serves_next_transfer(receiver)


def test_wrong_num_tokens_fails_before_any_write() -> None:
    receiver = Receiver(num_tokens=NUM_TOKENS + 1)
    with pytest.raises(TransferError, match="num_tokens: sender 7, receiver reserved 8") as caught:
        receiver.run(good_stream())
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    assert receiver.sink.writes == [] and len(receiver.results) == 1
    assert receiver.table.num_pending == 0


def test_second_push_for_a_transfer_in_progress_is_refused() -> None:
    receiver = Receiver()
    messages = good_stream()
    first = receiver.session()
    first.handle(messages[0])
    second = receiver.session()
    with pytest.raises(TransferError, match="already in progress") as caught:
        second.handle(messages[0])
    assert caught.value.code is StatusCode.FAILED_PRECONDITION
    for message in messages[1:]:
        first.handle(message)
    first.end()
    assert [r.ok for r in receiver.results] == [True]


def test_cancel_mid_stream_stops_writes_and_silences_on_done() -> None:
    receiver = Receiver()
    messages = good_stream()
    session = receiver.session()
    for message in messages[:3]:
        session.handle(message)
    receiver.table.cancel("t1")
    assert receiver.num_aborts == 1
    with pytest.raises(TransferError) as caught:
        for message in messages[3:]:
            session.handle(message)
        session.end()
    assert caught.value.code is StatusCode.CANCELLED
    assert len(receiver.sink.writes) == 2
    assert receiver.results == []
    receiver.table.cancel("t1")  # idempotent
    _assert_serves_next_transfer(receiver)


def test_transport_abort_reports_once() -> None:
    receiver = Receiver()
    session = receiver.session()
    for message in good_stream()[:2]:
        session.handle(message)
    session.abort(TransferCancelled("sender went away"))
    session.abort(TransferCancelled("again"))
    [result] = receiver.results
    assert result.error is not None and result.error.message == "sender went away"
    assert receiver.table.num_pending == 0


def test_sink_error_fails_the_transfer() -> None:
    receiver = Receiver()

    def broken_write(chunk: ChunkSpec, data: memoryview) -> None:
        raise RuntimeError("blocks were freed")

    receiver.sink.write = broken_write  # type: ignore[method-assign]
    with pytest.raises(TransferError, match="blocks were freed") as caught:
        receiver.run(good_stream())
    assert caught.value.code is StatusCode.INTERNAL
    assert [r.ok for r in receiver.results] == [False]
