"""The one-copy chunk encoder writes exactly the KVMessage protobuf would (the receiver parses
it with protobuf)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvtransfer import ChunkSpec
from kvtransfer.grpc_codec import encode_message, message_to_proto
from kvtransfer.stream import Chunk, Commit
from pdserve.internal.v1 import kv_transfer_pb2

u32 = st.integers(0, 2**32 - 1)


@given(
    spec=st.builds(ChunkSpec, u32, u32, u32, u32, u32),
    crc=u32,
    data=st.binary(min_size=1, max_size=70_000),
    as_view=st.booleans(),
)
def test_encoded_chunk_parses_to_the_same_message(
    spec: ChunkSpec, crc: int, data: bytes, as_view: bool
) -> None:
    chunk = Chunk(spec, crc, memoryview(data) if as_view else data)
    parsed = kv_transfer_pb2.KVMessage.FromString(encode_message(chunk))
    assert parsed == message_to_proto(chunk)


def test_other_messages_use_protobuf() -> None:
    commit = Commit(num_chunks=3, first_token_id=42)
    assert encode_message(commit) == message_to_proto(commit).SerializeToString()
