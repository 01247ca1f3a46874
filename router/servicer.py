"""The public `pdserve.v1.Generation` service: thin adapters between protobuf and the flow.

Protobuf stays here: requests are validated into `ValidatedRequest`, the flow's chunks become
`GenerateResponse`s, and every `PdserveError` ends the call through `abort_with` (the one
mapping to gRPC statuses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from pdserve.config import PdserveConfig
from pdserve.errors import PdserveError, ResourceExhausted, Unavailable
from pdserve.metrics import RouterMetrics
from pdserve.v1 import pdserve_pb2
from router.colocated_attempt import NO_KV_TRANSPORT
from router.replica_pool import ReplicaPool
from router.request_codec import InvalidRequestBytes, generate_request_deserializer
from router.request_flow import Completion, RequestFlow, StreamChunk
from router.scaling import pool_limits
from router.status import abort_with
from router.tokenizer import RouterTokenizer
from router.validation import validate_request

SERVICE_NAME = "pdserve.v1.Generation"
_FINISH_REASONS = {
    "stop": pdserve_pb2.FINISH_REASON_STOP,
    "length": pdserve_pb2.FINISH_REASON_LENGTH,
    "cancelled": pdserve_pb2.FINISH_REASON_CANCELLED,
}
_REPLICA_STATES = {
    "starting": pdserve_pb2.REPLICA_STATE_STARTING,
    "ready": pdserve_pb2.REPLICA_STATE_READY,
    "unresponsive": pdserve_pb2.REPLICA_STATE_UNRESPONSIVE,
    "dead": pdserve_pb2.REPLICA_STATE_DEAD,
    "draining": pdserve_pb2.REPLICA_STATE_DRAINING,
}


class GenerationServicer:
    def __init__(
        self,
        config: PdserveConfig,
        tokenizer: RouterTokenizer,
        flow: RequestFlow,
        prefill_pool: ReplicaPool,
        decode_pool: ReplicaPool,
        model_name: str,
        version: str,
        metrics: RouterMetrics | None = None,
        colocated_pool: ReplicaPool | None = None,
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._flow = flow
        self._prefill_pool = prefill_pool
        self._decode_pool = decode_pool
        # Set in `mode: colocated`: Info then shows it, and no prefill or decode pool.
        self._colocated_pool = colocated_pool if config.mode == "colocated" else None
        self._model_name = model_name
        self._version = version
        self._max_context_tokens = min(
            config.model.max_context_tokens, tokenizer.max_context_tokens
        )
        self.num_inflight = 0
        self._metrics = metrics or RouterMetrics()
        self._metrics.watch_inflight(lambda: self.num_inflight)
        # Set by `drain()`: new requests are refused, in-flight ones finish.
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method table, with the size-limited, UTF-8-safe request parser."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.Generate,
                    request_deserializer=generate_request_deserializer(
                        self._config.limits.max_request_bytes
                    ),
                    response_serializer=pdserve_pb2.GenerateResponse.SerializeToString,
                ),
                "Info": grpc.unary_unary_rpc_method_handler(
                    self.Info,
                    request_deserializer=pdserve_pb2.InfoRequest.FromString,
                    response_serializer=pdserve_pb2.InfoResponse.SerializeToString,
                ),
            },
        )

    async def Generate(  # noqa: N802 - gRPC method name
        self,
        request: pdserve_pb2.GenerateRequest | InvalidRequestBytes,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        # Unless set below, the call ended because the client went away (grpc cancelled it).
        outcome = "CANCELLED"
        try:
            if isinstance(request, InvalidRequestBytes):
                raise request.to_error()
            validated = validate_request(
                request, self._tokenizer, self._config.limits, self._max_context_tokens
            )
            if self._draining:
                raise Unavailable("the server is shutting down")
            if self.num_inflight >= self._config.router.max_inflight_requests:
                raise ResourceExhausted(
                    f"router at capacity ({self.num_inflight} requests in flight)"
                )
            self.num_inflight += 1
            self._idle.clear()
            try:
                async for chunk in self._flow.run(validated, self._deadline(context)):
                    yield _to_proto(chunk)
                outcome = "OK"
            finally:
                self.num_inflight -= 1
                if not self.num_inflight:
                    self._idle.set()
        except PdserveError as exc:
            outcome = exc.code.value
            await abort_with(context, exc)
        except Exception:
            outcome = "UNKNOWN"  # what grpc reports for an unexpected exception
            raise
        finally:
            self._metrics.count_request(outcome)

    async def drain(self, grace_s: float) -> bool:
        """Refuses new requests and waits up to `grace_s` for in-flight ones to finish.
        Returns whether they all did."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def Info(  # noqa: N802 - gRPC method name
        self, request: pdserve_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pdserve_pb2.InfoResponse:
        return pdserve_pb2.InfoResponse(
            model=self._model_name,
            dtype=self._config.model.dtype,
            mode=self._config.mode,
            version=self._version,
            max_context_tokens=self._max_context_tokens,
            # The router refuses to start with a tokens file that holds no token.
            auth_required=self._config.security.api_tokens_file is not None,
            **self._pools_info(),
        )

    def _pools_info(self) -> dict[str, Any]:
        """Info's pool fields, KV transport and block size for the configured mode."""
        config = self._config
        if self._colocated_pool is not None:
            return {
                "colocated": _pool_info(self._colocated_pool, config),
                "kv_transport": NO_KV_TRANSPORT,
                "kv_block_size": config.colocated.kv_cache.block_size,
            }
        return {
            "prefill": _pool_info(self._prefill_pool, config),
            "decode": _pool_info(self._decode_pool, config),
            "kv_transport": config.kv_transfer.transport,
            "kv_block_size": config.decode.kv_cache.block_size,
        }

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """Wall-clock deadline: the client's, capped by config; the default when unset."""
        timeouts = self._config.timeouts
        remaining = context.time_remaining()
        seconds = timeouts.default_deadline_s if remaining is None else remaining
        return time.time() + min(seconds, timeouts.max_deadline_s)


def _to_proto(chunk: StreamChunk) -> pdserve_pb2.GenerateResponse:
    response = pdserve_pb2.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text)
    if chunk.completion is not None:
        response.final.CopyFrom(_final_info(chunk.completion))
    return response


def _final_info(completion: Completion) -> pdserve_pb2.FinalInfo:
    timings: dict[str, Any] = completion.timings
    return pdserve_pb2.FinalInfo(
        finish_reason=_FINISH_REASONS.get(
            completion.finish_reason, pdserve_pb2.FINISH_REASON_UNSPECIFIED
        ),
        usage=pdserve_pb2.Usage(
            prompt_tokens=completion.num_prompt_tokens,
            completion_tokens=completion.num_completion_tokens,
        ),
        timings=pdserve_pb2.Timings(**timings),
        request_id=completion.request_id,
        served_by=pdserve_pb2.ServedBy(
            mode=completion.mode,
            kv_transport=completion.kv_transport,
            prefill_replica=completion.prefill_replica,
            decode_replica=completion.decode_replica,
            kv_bytes=completion.kv_bytes,
            num_migrations=completion.num_migrations,
        ),
    )


def _pool_info(pool: ReplicaPool, config: PdserveConfig) -> pdserve_pb2.PoolInfo:
    """The pool's replicas and sizes; the pool's role names its config section."""
    replicas = []
    for replica in pool.replicas:
        load = replica.load
        replicas.append(
            pdserve_pb2.ReplicaInfo(
                replica_id=replica.replica_id,
                state=_REPLICA_STATES[replica.state],
                num_active_requests=load.num_active_requests if load else 0,
                num_free_blocks=load.num_free_blocks if load else 0,
                num_total_blocks=load.num_total_blocks if load else 0,
                node_id=load.node_id if load else "",
            )
        )
    limits = pool_limits(config, pool.role)
    return pdserve_pb2.PoolInfo(
        configured_replicas=getattr(config, pool.role).replicas,
        replicas=replicas,
        target_replicas=pool.target_replicas,
        min_replicas=limits.min_replicas,
        max_replicas=limits.max_replicas,
        autoscale=limits.autoscale_enabled,
    )
