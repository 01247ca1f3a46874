"""The `grpc` backend: pdserve's router over `pdserve.v1.Generation`.

All requests share one `grpc.aio` channel. `Info` gives the model and the context limit, so a
workload that cannot fit fails before any request is sent. Every request is greedy with
`ignore_eos`; the final message carries the server's usage, timings and placement.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from pdserve.bench.backends import Clock
from pdserve.bench.options import BenchOptions
from pdserve.bench.records import NO_FINAL, PENDING, RequestRecord
from pdserve.bench.workload import RequestShape
from pdserve.client import MAX_CA_FILE_BYTES, make_request
from pdserve.errors import InvalidArgument
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

INFO_TIMEOUT_S = 30.0
Metadata = tuple[tuple[str, str], ...]


class GrpcBackend:
    """Streams `Generate` calls on `stub`; see `pdserve.bench.backends.Backend`."""

    def __init__(
        self, stub: pdserve_pb2_grpc.GenerationStub, timeout_s: float | None, metadata: Metadata
    ) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._metadata = metadata

    @property
    def request_form(self) -> dict[str, Any]:
        return {
            "api": "pdserve.v1.Generation/Generate",
            "prompt": "token ids, or text for ShareGPT",
            "ignore_eos_sent": True,
            "itl_over": "tokens",
        }

    async def describe(self) -> dict[str, Any]:
        info = await self._stub.Info(
            pdserve_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S, metadata=self._metadata
        )
        return _server_facts(info)

    async def stream(self, record: RequestRecord, shape: RequestShape, clock: Clock) -> None:
        # Built before the clock starts: TTFT should not include building a long prompt.
        request = make_request(shape.prompt, max_tokens=shape.max_tokens, ignore_eos=True)
        record.send_s = clock()
        call = self._stub.Generate(request, timeout=self._timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                if response.token_ids:
                    record.add_message(clock() - record.send_s, len(response.token_ids))
                if response.HasField("final"):
                    record.apply_final(response.final)
            if record.status == PENDING:
                record.status = NO_FINAL
        except grpc.aio.AioRpcError as exc:
            record.status = exc.code().name
            record.error = exc.details() or ""
        finally:
            record.end_s = clock()
            call.cancel()  # no-op once the stream ended


@asynccontextmanager
async def open_grpc_backend(options: BenchOptions) -> AsyncIterator[GrpcBackend]:
    """A GrpcBackend on a channel to `options.address`, closed on exit. Raises
    InvalidArgument("--tls-ca", ...) when the CA file cannot be used."""
    token = options.bearer_token
    metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with _open_channel(options) as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        yield GrpcBackend(stub, options.timeout_s, metadata)


def _open_channel(options: BenchOptions) -> grpc.aio.Channel:
    if options.tls_ca_file is None:
        return grpc.aio.insecure_channel(options.address)
    try:
        with open(options.tls_ca_file, "rb") as file:
            root_certificates = file.read(MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidArgument("--tls-ca", f"cannot read: {exc.strerror or exc}") from None
    if len(root_certificates) > MAX_CA_FILE_BYTES:
        raise InvalidArgument("--tls-ca", f"larger than {MAX_CA_FILE_BYTES} bytes")
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.aio.secure_channel(options.address, credentials)


def _server_facts(info: pdserve_pb2.InfoResponse) -> dict[str, Any]:
    return {
        "model": info.model,
        "dtype": info.dtype,
        "mode": info.mode,
        "kv_transport": info.kv_transport,
        "version": info.version,
        "max_context_tokens": info.max_context_tokens,
        "num_prefill_replicas": len(info.prefill.replicas),
        "num_decode_replicas": len(info.decode.replicas),
        # Set in mode colocated (the prefill and decode pools are empty then).
        "num_colocated_replicas": len(info.colocated.replicas),
    }
