"""KV fixtures of the wire-dtype tests: a small fp32 layout, KV values, tensor sources and
sinks, a spy on the bytes a chunk carries, and the int8 accuracy bound."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from kvtransfer import ChunkSpec, KVLayout, plan_chunks
from kvtransfer.faults import ChunkFault
from kvtransfer.receive_session import ReceiveSession
from kvtransfer.stream import Chunk, Header, Message, outgoing_messages
from kvtransfer.transfer_table import Expectation, TransferTable
from kvtransfer.wire_dtype import WireDecoder, encode_chunk, wire_chunk_bytes
from pdserve.config import KVTransferConfig
from tests.unit.test_kv_grpc_transport import DoneRecorder

TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUT = KVLayout("fp-wire", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32")
NUM_TOKENS = 37
CONFIG = KVTransferConfig(chunk_bytes=4096, max_message_bytes=128 * 1024, timeout_s=10.0)
# Slack for float32 rounding on top of the scale / 2 bound of int8.
REL_EPS = 1e-5


def kv_values(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """[2 (keys, values), layers, tokens, heads, head_dim] in the cache dtype."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim)
    return torch.randn(shape, generator=generator).to(TORCH_DTYPE[layout.dtype])


def chunk_of(kv: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    return kv[:, spec.layer_start:spec.layer_end, spec.token_start:spec.token_end]


def as_bytes(values: torch.Tensor) -> bytes:
    return values.contiguous().view(torch.uint8).numpy().tobytes()


class TensorSource:
    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.num_reads = 0

    def read(self, chunk: ChunkSpec) -> bytes:
        self.num_reads += 1
        return as_bytes(chunk_of(self.kv, chunk))


class TensorSink:
    def __init__(self, like: torch.Tensor) -> None:
        self.kv = torch.full_like(like, float("nan"))
        self.num_writes = 0

    def write(self, chunk: ChunkSpec, data: memoryview) -> None:
        target = chunk_of(self.kv, chunk)
        values = torch.frombuffer(bytearray(data), dtype=self.kv.dtype)
        target.copy_(values.reshape(target.shape))
        self.num_writes += 1


class WireSpy(ChunkFault):
    """Passes every message through and records the chunk bytes each carries on the wire."""

    def __init__(self) -> None:
        super().__init__("delay")
        object.__setattr__(self, "num_wire_bytes", 0)

    def apply(self, messages: Iterator[Message]) -> Iterator[Message]:
        for message in messages:
            if isinstance(message, Chunk):
                object.__setattr__(self, "num_wire_bytes",
                                   self.num_wire_bytes + memoryview(message.data).nbytes)
            yield message


def restore(layout: KVLayout, wire_dtype: str, values: torch.Tensor) -> torch.Tensor:
    """`values` ([2, layers, tokens, heads, dim]) through the wire and back, one chunk."""
    spec = ChunkSpec(0, 0, values.shape[1], 0, values.shape[2])
    wire = encode_chunk(layout, wire_dtype, as_bytes(values))
    assert memoryview(wire).nbytes == wire_chunk_bytes(layout, wire_dtype, spec)
    out = WireDecoder(layout, wire_dtype).decode(spec, memoryview(wire))
    return torch.frombuffer(bytearray(out), dtype=values.dtype).reshape(values.shape)


def int8_scales(layout: KVLayout, values: torch.Tensor) -> torch.Tensor:
    """The scales as they travel: after the int8 values, [2, layers, tokens, heads] float32."""
    wire = memoryview(encode_chunk(layout, "int8", as_bytes(values)))
    num_values = values.numel()
    scales = np.frombuffer(wire, dtype="<f4", offset=num_values)
    return torch.from_numpy(scales.copy()).reshape(values.shape[:-1])


def assert_int8_close(restored: torch.Tensor, source: torch.Tensor, scales: torch.Tensor) -> None:
    """Each value within scale / 2 (plus float32 slack, plus the cache dtype's own rounding)."""
    exact = source.float()
    bound = scales.unsqueeze(-1) * (0.5 + REL_EPS)
    if source.dtype != torch.float32:
        bound = bound + exact.abs() * torch.finfo(source.dtype).eps
    error = (restored.float() - exact).abs()
    assert not torch.isnan(restored).any()
    assert bool((error <= bound + 1e-44).all()), float((error - bound).max())


def good_stream(wire_dtype: str, layout: KVLayout = LAYOUT) -> tuple[list[Message], torch.Tensor]:
    kv = kv_values(layout, NUM_TOKENS)
    chunks = plan_chunks(layout, NUM_TOKENS, CONFIG.chunk_bytes)
    header = Header("t1", layout, NUM_TOKENS, len(chunks), wire_dtype=wire_dtype)
    return list(outgoing_messages(header, chunks, TensorSource(kv), 42, lambda: False)), kv


def run_session(messages: list[Message], sink: TensorSink, layout: KVLayout = LAYOUT
                ) -> tuple[ReceiveSession, DoneRecorder]:
    table, done = TransferTable(), DoneRecorder()
    table.expect(Expectation("t1", NUM_TOKENS, sink, done))
    session = ReceiveSession(table, layout, abort_stream=lambda: None)
    for message in messages:
        session.handle(message)
    return session, done
