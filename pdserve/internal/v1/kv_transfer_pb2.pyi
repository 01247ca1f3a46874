from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayoutProto(_message.Message):
    __slots__ = ("format_version", "model_fingerprint", "num_layers", "num_kv_heads", "head_dim", "dtype")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, format_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("layout",)
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayoutProto
    def __init__(self, layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("layout", "group_store", "side_channel")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    GROUP_STORE_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayoutProto
    group_store: str
    side_channel: str
    def __init__(self, layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ..., group_store: _Optional[str] = ..., side_channel: _Optional[str] = ...) -> None: ...

class SideChannelRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class SideChannelReply(_message.Message):
    __slots__ = ("ticket", "ttl_ms")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    ttl_ms: int
    def __init__(self, ticket: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class JoinGroupRequest(_message.Message):
    __slots__ = ("sender_id", "group_id", "backend")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    group_id: str
    backend: str
    def __init__(self, sender_id: _Optional[str] = ..., group_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class JoinGroupReply(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: _Optional[str] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("transfer_id", "layout", "num_tokens", "num_chunks", "group_id", "side_channel", "wire_dtype")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    layout: KVLayoutProto
    num_tokens: int
    num_chunks: int
    group_id: str
    side_channel: bool
    wire_dtype: str
    def __init__(self, transfer_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ..., num_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ..., group_id: _Optional[str] = ..., side_channel: _Optional[bool] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("seq", "layer_start", "layer_end", "token_start", "token_end", "crc32c", "data", "shm", "via_group")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    VIA_GROUP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    crc32c: int
    data: bytes
    shm: ShmRef
    via_group: bool
    def __init__(self, seq: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., crc32c: _Optional[int] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., via_group: _Optional[bool] = ...) -> None: ...

class ShmRef(_message.Message):
    __slots__ = ("segment", "offset", "length")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    length: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class KVCommit(_message.Message):
    __slots__ = ("num_chunks", "first_token_id", "chunk_crc32c")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CRC32C_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    first_token_id: int
    chunk_crc32c: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_chunks: _Optional[int] = ..., first_token_id: _Optional[int] = ..., chunk_crc32c: _Optional[_Iterable[int]] = ...) -> None: ...

class KVMessage(_message.Message):
    __slots__ = ("header", "chunk", "commit")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    chunk: KVChunk
    commit: KVCommit
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., commit: _Optional[_Union[KVCommit, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("num_bytes",)
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    def __init__(self, num_bytes: _Optional[int] = ...) -> None: ...
