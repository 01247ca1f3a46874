"""A running pdserve service: Ray (local or joined), both replica pools, and the router.

`Service.start()` initialises Ray (unless the process already did), creates the pools from the
config, waits for every replica to load the model, and runs the router's asyncio gRPC server in
a background thread. `stop()` shuts the router down and kills the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from typing import Any

import ray

from pdserve.config import PdserveConfig
from pdserve.pools import (
    RayReplicaFactory,
    create_colocated_pool,
    create_pools,
    kill_pools,
    wait_until_ready,
)
from router.auth import load_public_security
from router.server import Router

logger = logging.getLogger(__name__)


class Service:
    def __init__(self, config: PdserveConfig, ray_address: str | None = None) -> None:
        if config.kv_transfer.auth_token is None:
            # The replicas' internal KV credential: minted per start, never shown to clients.
            kv_transfer = config.kv_transfer.model_copy(
                update={"auth_token": secrets.token_hex(32)}
            )
            config = config.model_copy(update={"kv_transfer": kv_transfer})
        self.config = config
        self._ray_address = ray_address if ray_address is not None else config.ray.address
        self._started_ray = False
        self._prefill: dict[str, Any] = {}
        self._decode: dict[str, Any] = {}
        self._colocated: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self.router: Router | None = None
        self.port = 0

    @property
    def router_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the router runs on (None when stopped): for diagnostics, e.g. the
        stacks of its tasks when a test finds a request still in flight."""
        return self._loop

    @property
    def address(self) -> str:
        """Where clients reach the router ("host:port"); a wildcard bind shows as loopback."""
        host = self.config.router.host
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def http_base_url(self) -> str:
        """Base URL of the OpenAI-compatible API ("" when `router.http_port` is null)."""
        router = self.router
        if router is None or router.http is None:
            return ""
        host = self.address.rsplit(":", 1)[0]
        scheme = "https" if self.config.security.tls_cert_file else "http"
        return f"{scheme}://{host}:{router.http_port}/v1"

    @property
    def prefill_actors(self) -> dict[str, Any]:
        """The prefill replicas now (live scaling adds and removes some)."""
        return self._live_actors("prefill", self._prefill)

    @property
    def decode_actors(self) -> dict[str, Any]:
        return self._live_actors("decode", self._decode)

    @property
    def colocated_actors(self) -> dict[str, Any]:
        """The colocated pool (`mode: colocated`; empty otherwise)."""
        return self._live_actors("colocated", self._colocated)

    def start(self) -> None:
        """Blocks until the router serves; raises if a replica fails to start."""
        # Bad token or TLS files fail the start now, not after the replicas loaded the model.
        load_public_security(self.config.security)
        self._init_ray()
        if self.config.mode == "colocated":
            logger.info(
                "mode colocated: %d replicas that prefill and decode; the prefill, decode and "
                "kv_transfer sections are ignored", self.config.colocated.replicas,
            )
            self._colocated = create_colocated_pool(self.config)
        else:
            self._prefill, self._decode = create_pools(self.config)
        try:
            wait_until_ready(
                {**self._prefill, **self._decode, **self._colocated},
                self.config.timeouts.replica_start_s,
            )
            self._start_router()
        except BaseException:
            self.stop()
            raise

    def wait(self) -> None:
        """Blocks until `stop()` is called (from a signal handler or another thread)."""
        self._stop_requested.wait()

    def stop(self) -> None:
        """Stops the router and the replicas; safe to call more than once. Blocks while the
        router drains, then up to `pools.CLOSE_TIMEOUT_S` while the replicas release what
        would outlive their processes (`pools.close_and_kill`)."""
        self._stop_requested.set()
        loop, router, thread = self._loop, self.router, self._thread
        self._loop, self.router, self._thread = None, None, None
        if loop is not None and router is not None:
            drain_s = self.config.timeouts.drain_grace_s
            asyncio.run_coroutine_threadsafe(router.stop(), loop).result(timeout=drain_s + 30)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=30)
        # Replicas live scaling started (or was still starting or draining) are killed too.
        scaled = router.actors() if router is not None else {}
        kill_pools(self._prefill, self._decode, self._colocated, scaled)
        self._prefill, self._decode, self._colocated = {}, {}, {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _live_actors(self, role: str, started: dict[str, Any]) -> dict[str, Any]:
        router = self.router
        return router.actors(role) if router is not None else dict(started)

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        local = self._ray_address is None
        ray.init(
            address=self._ray_address,
            namespace=self.config.ray.namespace,
            num_cpus=self.config.ray.num_cpus if local else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        self._started_ray = True

    def _start_router(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router", daemon=True)
        self._thread.start()
        self.router = Router(
            self.config, self._prefill, self._decode, self._colocated,
            replica_factory=RayReplicaFactory(self.config),
        )
        future = asyncio.run_coroutine_threadsafe(self.router.start(), self._loop)
        self.port = future.result(timeout=self.config.timeouts.replica_start_s)
