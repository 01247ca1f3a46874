"""The public `pdserve.v1.Generation` service: thin adapters between protobuf and the front door.

Protobuf stays here: requests become `GenerateInput`s (`router.proto_input`) that the
`FrontDoor` validates, admits and runs (the same path the OpenAI HTTP API takes), its chunks
become `GenerateResponse`s written through a `ClientStream` (`router.client_stream`: bounded
buffering, stalled clients, drain cuts), and every `PdserveError` ends the call through
`abort_with` (the one mapping to gRPC statuses).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from pdserve.config import PdserveConfig
from pdserve.errors import PdserveError
from pdserve.messages import TokenLogprobs
from pdserve.metrics import RouterMetrics
from pdserve.v1 import pdserve_pb2
from router.client_stream import StreamEnd
from router.colocated_attempt import NO_KV_TRANSPORT
from router.front_door import FrontDoor, new_request_id
from router.proto_input import input_from_proto
from router.replica_pool import ReplicaPool
from router.request_codec import (
    InvalidRequestBytes,
    generate_request_deserializer,
    request_deserializer,
)
from router.request_flow import Completion, StreamChunk
from router.scaling import pool_limits
from router.status import abort_with

SERVICE_NAME = "pdserve.v1.Generation"
# A call cancelled this close to its deadline ended because of it (see `_deadline_passed`).
DEADLINE_SLACK_S = 0.05
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
        front_door: FrontDoor,
        prefill_pool: ReplicaPool,
        decode_pool: ReplicaPool,
        model_name: str,
        version: str,
        metrics: RouterMetrics | None = None,
        colocated_pool: ReplicaPool | None = None,
    ) -> None:
        self._config = config
        self._front_door = front_door
        self._prefill_pool = prefill_pool
        self._decode_pool = decode_pool
        # Set in `mode: colocated`: Info then shows it, and no prefill or decode pool.
        self._colocated_pool = colocated_pool if config.mode == "colocated" else None
        self._model_name = model_name
        self._version = version
        self._metrics = metrics or RouterMetrics()

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
                    request_deserializer=request_deserializer(
                        pdserve_pb2.InfoRequest, self._config.limits.max_request_bytes
                    ),
                    response_serializer=pdserve_pb2.InfoResponse.SerializeToString,
                ),
            },
        )

    async def Generate(  # noqa: N802 - gRPC method name
        self,
        request: pdserve_pb2.GenerateRequest | InvalidRequestBytes,
        context: grpc.aio.ServicerContext,
    ) -> None:
        # Written with `context.write` (not yielded): a write to a client that grants no
        # flow-control window blocks, and the client stream bounds how long (`client_stall_s`).
        # Unless set below, the call ended because the client went away (grpc cancelled it).
        outcome = "CANCELLED"
        try:
            if isinstance(request, InvalidRequestBytes):
                raise request.to_error()
            validated = await self._front_door.validate(input_from_proto(request))
            deadline = self._front_door.deadline(context.time_remaining())
            request_id = new_request_id()
            stream = self._front_door.client_stream(validated, request_id, "grpc")
            _cancel_when_the_call_ends(context)
            end = await stream.send(
                self._front_door.generate(validated, deadline, request_id, stream.reader),
                lambda choice: _write(context, choice.chunk),
            )
            outcome = end.outcome
            if end is StreamEnd.STALLED:
                # No status can pass the unsent message (it would wait until the client leaves,
                # and grpc then logs an error): end as cancelled, which sends none; the call
                # ends at the client's deadline or disconnect.
                raise asyncio.CancelledError
        except PdserveError as exc:
            outcome = exc.code.value
            await abort_with(context, exc)
        except _CallEnded:
            outcome = "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
            raise asyncio.CancelledError from None  # the call is over: grpc sends no status
        except asyncio.CancelledError:
            if _deadline_passed(context):
                outcome = "DEADLINE_EXCEEDED"  # grpc ended the call at the client's deadline
            raise
        except Exception:
            outcome = "UNKNOWN"  # what grpc reports for an unexpected exception
            raise
        finally:
            self._metrics.count_request(outcome)

    async def Info(  # noqa: N802 - gRPC method name
        self,
        request: pdserve_pb2.InfoRequest | InvalidRequestBytes,
        context: grpc.aio.ServicerContext,
    ) -> pdserve_pb2.InfoResponse:
        if isinstance(request, InvalidRequestBytes):
            await abort_with(context, request.to_error())
        return pdserve_pb2.InfoResponse(
            model=self._model_name,
            dtype=self._config.model.dtype,
            mode=self._config.mode,
            version=self._version,
            max_context_tokens=self._front_door.max_context_tokens,
            # The router refuses to start with a tokens file that holds no token.
            auth_required=self._config.security.api_tokens_file is not None,
            num_queued_requests=self._front_door.num_queued,
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


class _CallEnded(Exception):
    """grpc refused a write: the call had already ended (its deadline passed or its client
    left) before the handler was cancelled."""


async def _write(context: grpc.aio.ServicerContext, chunk: StreamChunk) -> None:
    message = _to_proto(chunk)
    try:
        await context.write(message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # grpc's own (private) error types
        raise _CallEnded() from exc


def _cancel_when_the_call_ends(context: grpc.aio.ServicerContext) -> None:
    """Cancels the handler's task once the call is over (the client cancelled or left, or its
    deadline passed) while it still runs: grpc does not always cancel a handler that is
    waiting on something other than grpc itself (here: the next chunk of a held stream)."""
    handler = asyncio.current_task()
    assert handler is not None, "called from the handler's task"

    def on_done(_: object) -> None:
        if not handler.done():
            handler.cancel()

    context.add_done_callback(on_done)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call's deadline has passed (or is within `DEADLINE_SLACK_S`: a client's
    cancel at its deadline can reach the server a moment before the server's own timer)."""
    time_remaining = context.time_remaining()
    return time_remaining is not None and time_remaining <= DEADLINE_SLACK_S


def _to_proto(chunk: StreamChunk) -> pdserve_pb2.GenerateResponse:
    response = pdserve_pb2.GenerateResponse(
        token_ids=chunk.token_ids,
        text=chunk.text,
        logprobs=[_logprobs_proto(entry) for entry in chunk.logprobs],
    )
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
            cached_prompt_tokens=completion.num_cached_tokens,
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
            num_preemptions=completion.num_preemptions,
        ),
    )


def _logprobs_proto(entry: TokenLogprobs) -> pdserve_pb2.TokenLogprobs:
    return pdserve_pb2.TokenLogprobs(
        token_id=entry.token_id,
        logprob=entry.logprob,
        top=[
            pdserve_pb2.TopLogprob(token_id=token_id, logprob=logprob)
            for token_id, logprob in zip(entry.top_token_ids, entry.top_logprobs)
        ],
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
                kernels=load.kernels if load else "",
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
