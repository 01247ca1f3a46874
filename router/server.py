"""The router process: replica pools, tokenizer, gRPC server and health, started and stopped.

`Router.start()` needs the replica actor handles (created by `pdserve.serve`); it learns the
model from a replica, refuses pools that serve different models (their KV could never be
handed over), and serves `pdserve.v1.Generation` plus `grpc.health.v1.Health` on the
configured address, with the bearer-token interceptor and TLS that `config.security` asks for
(see `router.auth`). Health is SERVING only while both pools have a ready replica (in
`mode: colocated`: while the colocated pool has one; no prefill or decode pool runs then).
`pdserve.v1.Admin` on the same port resizes the running pools (`router.live_scaling`), given a
replica factory to start actors with.
"""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from pdserve.config import PdserveConfig
from pdserve.errors import FailedPrecondition
from pdserve.messages import ModelInfo
from pdserve.metrics import RouterMetrics
from router.admin_servicer import AdminServicer
from router.auth import PublicSecurity, load_public_security
from router.front_door import FrontDoor
from router.health_service import health_handler
from router.http import HttpServer
from router.live_scaling import LiveScaling
from router.pool_scaler import ReplicaFactory
from router.ray_calls import call_message
from router.replica_pool import ReplicaPool
from router.request_codec import grpc_receive_limit
from router.request_flow import RequestFlow
from router.servicer import SERVICE_NAME, GenerationServicer
from router.tokenizer import RouterTokenizer

logger = logging.getLogger(__name__)

MODEL_INFO_TIMEOUT_S = 60.0


class Router:
    def __init__(
        self,
        config: PdserveConfig,
        prefill_actors: dict[str, Any],
        decode_actors: dict[str, Any],
        colocated_actors: dict[str, Any] | None = None,
        replica_factory: ReplicaFactory | None = None,
    ) -> None:
        """`replica_factory` starts and kills actors for live scaling (None: pools keep their
        size and Admin.Scale fails with FAILED_PRECONDITION)."""
        self._config = config
        self._replica_factory = replica_factory
        self.scaling: LiveScaling | None = None
        timeouts = config.timeouts
        self.prefill_pool = ReplicaPool(
            "prefill", timeouts.load_poll_interval_s, timeouts.load_poll_timeout_s
        )
        self.decode_pool = ReplicaPool(
            "decode", timeouts.load_poll_interval_s, timeouts.load_poll_timeout_s
        )
        for replica_id, handle in prefill_actors.items():
            self.prefill_pool.add(replica_id, handle)
        for replica_id, handle in decode_actors.items():
            self.decode_pool.add(replica_id, handle)
        self.colocated_pool = ReplicaPool(
            "colocated", timeouts.load_poll_interval_s, timeouts.load_poll_timeout_s
        )
        for replica_id, handle in (colocated_actors or {}).items():
            self.colocated_pool.add(replica_id, handle)
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self.servicer: GenerationServicer | None = None
        self.front_door: FrontDoor | None = None
        self.http: HttpServer | None = None
        self.port = 0
        self.http_port = 0
        # Counted even when not served (`metrics.enabled: false`); `metrics.address` says where.
        self.metrics = RouterMetrics()

    async def start(self) -> int:
        """Starts serving; returns the bound port. Raises FailedPrecondition when the pools
        serve different models."""
        model_info = await self._model_info()
        tokenizer = RouterTokenizer.from_model_info(model_info)
        if not model_info.chat_template:
            logger.warning(
                "%s has no chat template: chat requests (gRPC prompt.messages, "
                "POST /v1/chat/completions) are refused with INVALID_ARGUMENT / 400",
                model_info.model,
            )
        flow = RequestFlow(
            self._config, tokenizer, self.prefill_pool, self.decode_pool, self.metrics,
            colocated_pool=self.colocated_pool,
        )
        # The front door waits for slots in the flow's queue: one queue for all capacity.
        self.front_door = FrontDoor(self._config, tokenizer, flow, self.metrics)
        self.servicer = GenerationServicer(
            self._config, self.front_door, self.prefill_pool, self.decode_pool,
            model_name=model_info.model, version=_pdserve_version(), metrics=self.metrics,
            colocated_pool=self.colocated_pool,
        )
        self.scaling = LiveScaling(
            self._config, {pool.role: pool for pool in self._active_pools()},
            self._replica_factory, model_info, self.metrics, flow.wait_queue.depth,
        )
        self._serve_metrics()
        security = load_public_security(self._config.security)
        server = grpc.aio.server(
            interceptors=security.interceptors,
            options=[(
                "grpc.max_receive_message_length",
                grpc_receive_limit(self._config.limits.max_request_bytes),
            )],
        )
        server.add_generic_rpc_handlers((
            self.servicer.handler(),
            AdminServicer(self.scaling.controller).handler(),
            health_handler(self._health),
        ))
        router_config = self._config.router
        bind_address = f"{router_config.host}:{router_config.port}"
        if security.credentials is None:
            self.port = server.add_insecure_port(bind_address)
        else:
            self.port = server.add_secure_port(bind_address, security.credentials)
        _log_security(security, router_config.host, self.port)
        # grpc's health servicer starts out SERVING; nothing is known about the pools yet.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        await self._start_http(model_info, security)
        for pool in self._active_pools():
            await pool.poll_once()
        await self._update_health()
        for pool in self._active_pools():
            pool.on_change.append(self._schedule_health_update)
            pool.start()
        self.scaling.start()
        logger.info("router serving on %s:%d", router_config.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Drains, then stops: health goes NOT_SERVING, new requests get UNAVAILABLE, and
        in-flight streams may finish within `timeouts.drain_grace_s`; the rest are cut."""
        await self._health.enter_graceful_shutdown()
        grace_s = self._config.timeouts.drain_grace_s
        if self.front_door is not None:
            num_inflight = self.front_door.num_inflight
            if not await self.front_door.drain(grace_s):
                logger.warning("drain: streams still running after %.0f s are cut", grace_s)
            elif num_inflight:
                logger.info("drain: %d in-flight streams finished", num_inflight)
        if self.http is not None:
            await self.http.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self.front_door is not None:
            self.front_door.close()
        if self.scaling is not None:
            await self.scaling.stop()
        for pool in self._active_pools():
            await pool.stop()
        await asyncio.to_thread(self.metrics.stop)

    @property
    def serving(self) -> bool:
        """Whether health is SERVING: every active pool has a ready replica, not draining."""
        if self.front_door is None or self.front_door.draining:
            return False
        return all(pool.num_ready > 0 for pool in self._active_pools())

    async def _start_http(self, model_info: ModelInfo, security: PublicSecurity) -> None:
        """Starts the OpenAI-compatible HTTP API unless `router.http_port` is None."""
        router_config = self._config.router
        if router_config.http_port is None:
            logger.info("OpenAI HTTP API off (router.http_port is null)")
            return
        assert self.front_door is not None, "the front door is built first"
        self.http = HttpServer(
            self._config, self.front_door, security, model_info, self.metrics,
            is_serving=lambda: self.serving, version=_pdserve_version(),
        )
        self.http_port = await self.http.start(router_config.host, router_config.http_port)
        logger.info(
            "OpenAI HTTP API on %s://%s:%d/v1", "https" if security.tls else "http",
            router_config.host, self.http_port,
        )

    def actors(self, role: str | None = None) -> dict[str, Any]:
        """{replica_id: actor handle} of the replicas the pools (or the pool `role`) hold now,
        including ones still starting or draining (callable from another thread)."""
        return {
            replica.replica_id: replica.handle
            for pool in self._active_pools() if role in (None, pool.role)
            for replica in pool.replicas
        }

    async def _model_info(self) -> ModelInfo:
        infos = {}
        for pool in self._active_pools():
            for replica in pool.replicas:
                infos[replica.replica_id] = await call_message(
                    replica.handle.model_info, ModelInfo, timeout_s=MODEL_INFO_TIMEOUT_S,
                    what=f"{replica.replica_id}.model_info",
                )
        reference_id, reference = next(iter(infos.items()))
        for replica_id, info in infos.items():
            if (info.kv_fingerprint, info.dtype) != (reference.kv_fingerprint, reference.dtype):
                raise FailedPrecondition(
                    f"{replica_id} serves a different model or dtype than {reference_id}: "
                    "their KV cannot be handed over"
                )
        return reference

    def _serve_metrics(self) -> None:
        config = self._config.metrics
        if not config.enabled:
            return
        address = self.metrics.serve(config.host, config.router_port, "metrics.router_port")
        logger.info("router metrics on http://%s/metrics", address)

    def _schedule_health_update(self) -> None:
        asyncio.get_running_loop().create_task(self._update_health())

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    def _active_pools(self) -> tuple[ReplicaPool, ...]:
        """The pools the configured mode runs."""
        if self._config.mode == "colocated":
            return (self.colocated_pool,)
        return (self.prefill_pool, self.decode_pool)

    async def _update_health(self) -> None:
        serving = all(pool.num_ready > 0 for pool in self._active_pools())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._set_health(status)
        if not serving:
            logger.warning(
                "NOT_SERVING: %s",
                ", ".join(f"{p.num_ready} ready {p.role}" for p in self._active_pools()),
            )


def _log_security(security: PublicSecurity, host: str, port: int) -> None:
    if not security.auth_required:
        logger.warning(
            "public API is open: security.api_tokens_file is not set, so anyone who can reach "
            "%s:%d may call Generate and Info", host, port,
        )
    elif security.credentials is None and host not in ("127.0.0.1", "::1", "localhost"):
        logger.warning(
            "bearer tokens travel in plaintext to %s: set security.tls_cert_file and "
            "security.tls_key_file", host,
        )
    logger.info(
        "public API: auth %s, TLS %s",
        "required" if security.auth_required else "off",
        "on" if security.credentials is not None else "off",
    )


def _pdserve_version() -> str:
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"
