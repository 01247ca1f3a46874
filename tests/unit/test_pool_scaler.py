"""Live scaling mechanics without Ray: `PoolScaler` and `ScaleController` on a real
`ReplicaPool` whose replicas are fake actor handles (msgpack load reports, a kill flag), and
the `Admin.Scale` RPC behind the bearer-token interceptor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from pdserve.errors import FailedPrecondition, InvalidArgument, Unavailable
from pdserve.messages import LoadReport, encode
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from router.admin_servicer import AdminServicer
from router.auth import BearerTokenInterceptor
from router.pool_scaler import PlacementCheck, PoolScaler
from router.replica_pool import DRAINING, READY, STARTING, Replica, ReplicaPool
from router.scaling import PoolLimits, ScaleController
from tests.factories.waiting import until

POLL_S = 0.01
WAIT_S = 10.0


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class FakeActor:
    """Answers `load` once `loaded` is set (as a real actor answers once its model loaded)."""

    def __init__(self, replica_id: str, loaded: bool = True) -> None:
        self.replica_id = replica_id
        self.loaded = asyncio.Event()
        if loaded:
            self.loaded.set()
        self.killed = False
        self.num_active_requests = 0
        self.num_used_blocks = 0
        self.load = _Method(self._load)

    async def _load(self) -> bytes:
        await self.loaded.wait()
        if self.killed:
            raise Unavailable(f"{self.replica_id} was killed")
        return encode(
            LoadReport(
                replica_id=self.replica_id, role="decode", pid=1, node_id="node",
                num_active_requests=self.num_active_requests, num_waiting_requests=0,
                num_free_blocks=100 - self.num_used_blocks, num_total_blocks=100,
            )
        )


class FakeFactory:
    def __init__(self) -> None:
        self.created: dict[str, FakeActor] = {}
        self.killed: list[str] = []
        self.load_at_once = True

    def create(self, role: str, replica_id: str) -> FakeActor:
        actor = FakeActor(replica_id, loaded=self.load_at_once)
        self.created[replica_id] = actor
        return actor

    def kill(self, handle: FakeActor) -> None:
        handle.killed = True
        self.killed.append(handle.replica_id)


async def accept_model(replica: Replica) -> None:
    return None


def place_anywhere(role: str, num_replicas: int) -> None:
    return None


async def make_pool(*replica_ids: str) -> tuple[ReplicaPool, dict[str, FakeActor]]:
    pool = ReplicaPool(replica_ids[0].rpartition("-")[0], POLL_S, 1.0)
    actors = {replica_id: FakeActor(replica_id) for replica_id in replica_ids}
    for replica_id, actor in actors.items():
        pool.add(replica_id, actor)
    await pool.poll_once()
    return pool, actors


def make_scaler(
    pool: ReplicaPool, factory: FakeFactory, check_model: Any = accept_model,
    drain_timeout_s: float = WAIT_S, check_placement: PlacementCheck = place_anywhere,
) -> PoolScaler:
    return PoolScaler(
        pool, factory, check_model, check_placement=check_placement, start_timeout_s=WAIT_S,
        drain_timeout_s=drain_timeout_s, poll_interval_s=POLL_S,
    )


def states(pool: ReplicaPool) -> dict[str, str]:
    return {r.replica_id: r.state for r in pool.replicas}


async def test_new_replicas_join_only_once_loaded_with_fresh_ids() -> None:
    pool, _ = await make_pool("decode-0", "decode-2")
    factory = FakeFactory()
    factory.load_at_once = False
    scaler = make_scaler(pool, factory)
    assert pool.target_replicas == 2
    scaler.set_target(4)
    assert sorted(factory.created) == ["decode-3", "decode-4"]
    assert states(pool)["decode-3"] == STARTING
    await pool.poll_once()  # the background poll leaves replicas still loading alone
    assert states(pool)["decode-3"] == STARTING
    assert {r.replica_id for r in pool.by_most_free_blocks()} == {"decode-0", "decode-2"}
    factory.created["decode-3"].loaded.set()
    await until(lambda: states(pool)["decode-3"] == READY, "decode-3 ready")
    assert states(pool)["decode-4"] == STARTING
    factory.created["decode-4"].loaded.set()
    await until(lambda: pool.num_ready == 4, "4 ready")
    await scaler.stop()


async def test_scale_down_drains_the_least_loaded_then_kills_it_when_idle() -> None:
    pool, actors = await make_pool("decode-0", "decode-1", "decode-2")
    actors["decode-0"].num_active_requests = 2
    actors["decode-1"].num_active_requests = 1
    actors["decode-1"].num_used_blocks = 10
    actors["decode-2"].num_active_requests = 3
    await pool.poll_once()
    factory = FakeFactory()
    scaler = make_scaler(pool, factory)
    scaler.set_target(2)
    assert states(pool)["decode-1"] == DRAINING
    assert "decode-1" not in {r.replica_id for r in pool.by_most_free_blocks()}
    # Busy replicas stay, polled and draining, for as long as their requests run.
    for _ in range(3):
        await pool.poll(pool.get("decode-1"))
    assert factory.killed == [] and states(pool)["decode-1"] == DRAINING
    actors["decode-1"].num_active_requests = 0
    assert factory.killed == []  # blocks still held: not idle yet
    actors["decode-1"].num_used_blocks = 0
    await until(lambda: "decode-1" not in states(pool), "decode-1 removed")
    assert factory.killed == ["decode-1"]
    assert states(pool) == {"decode-0": READY, "decode-2": READY}
    await scaler.stop()


async def test_ties_remove_the_newest() -> None:
    pool, _ = await make_pool("decode-0", "decode-1", "decode-2")
    factory = FakeFactory()
    scaler = make_scaler(pool, factory)
    scaler.set_target(1)
    await until(lambda: len(pool.replicas) == 1, "two removed")
    assert sorted(factory.killed) == ["decode-1", "decode-2"]
    await scaler.stop()


async def test_growing_back_ends_a_drain_instead_of_starting_a_replica() -> None:
    pool, actors = await make_pool("decode-0", "decode-1")
    actors["decode-0"].num_active_requests = 2
    actors["decode-1"].num_active_requests = 1
    await pool.poll_once()
    factory = FakeFactory()
    scaler = make_scaler(pool, factory)
    scaler.set_target(1)
    assert states(pool)["decode-1"] == DRAINING
    scaler.set_target(2)
    assert states(pool)["decode-1"] == READY and factory.created == {}
    actors["decode-1"].num_active_requests = 0
    for _ in range(5):
        await pool.poll_once()
    assert factory.killed == [] and pool.num_ready == 2
    await scaler.stop()


async def test_scale_down_cancels_a_start_first() -> None:
    pool, _ = await make_pool("decode-0")
    factory = FakeFactory()
    factory.load_at_once = False
    scaler = make_scaler(pool, factory)
    scaler.set_target(2)
    scaler.set_target(1)
    assert factory.killed == ["decode-1"]
    assert list(states(pool)) == ["decode-0"]
    await scaler.stop()


async def test_a_replica_serving_another_model_is_killed_and_dropped() -> None:
    pool, _ = await make_pool("decode-0")
    factory = FakeFactory()

    async def reject(replica: Replica) -> None:
        raise FailedPrecondition(f"{replica.replica_id} serves a different model")

    scaler = make_scaler(pool, factory, check_model=reject)
    scaler.set_target(2)
    await until(lambda: factory.killed == ["decode-1"], "decode-1 killed")
    assert list(states(pool)) == ["decode-0"] and pool.target_replicas == 2
    await scaler.stop()


async def test_a_drain_that_outlasts_its_timeout_is_cut() -> None:
    pool, actors = await make_pool("decode-0", "decode-1")
    actors["decode-0"].num_active_requests = 2
    actors["decode-1"].num_active_requests = 1
    await pool.poll_once()
    factory = FakeFactory()
    scaler = make_scaler(pool, factory, drain_timeout_s=0.2)
    scaler.set_target(1)
    await until(lambda: factory.killed == ["decode-1"], "decode-1 killed")
    await scaler.stop()


async def test_controller_validates_every_pool_before_changing_any() -> None:
    prefill, _ = await make_pool("prefill-0")
    decode, _ = await make_pool("decode-0")
    factory = FakeFactory()
    controller = ScaleController(
        {"prefill": make_scaler(prefill, factory), "decode": make_scaler(decode, factory)},
        {"prefill": PoolLimits(1, 3, None), "decode": PoolLimits(1, 2, None)},
    )
    with pytest.raises(InvalidArgument) as caught:
        controller.scale({"prefill": 2, "decode": 3}, "test")
    assert caught.value.message.startswith('target_replicas["decode"]: 3 replicas is out of')
    assert "[1, 2]" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        controller.scale({"decode": 0}, "test")
    assert "[1, 2]" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        controller.scale({"colocated": 1}, "test")
    assert "unknown pool; pools: decode, prefill" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        controller.scale({"x" * 1000: 1}, "test")
    assert len(caught.value.message) < 200
    with pytest.raises(InvalidArgument) as caught:
        controller.scale({}, "test")
    assert caught.value.field == "target_replicas"
    assert factory.created == {} and controller.targets() == {"prefill": 1, "decode": 1}
    previous = controller.scale({"prefill": 2}, "test")
    assert previous == {"prefill": 1, "decode": 1}
    assert controller.targets() == {"prefill": 2, "decode": 1}
    assert list(factory.created) == ["prefill-1"]
    await controller.stop()


TOKEN = "admin-token-0123456789"


async def test_admin_scale_needs_the_token_and_names_the_bad_field() -> None:
    pool, _ = await make_pool("decode-0")
    factory = FakeFactory()
    controller = ScaleController(
        {"decode": make_scaler(pool, factory)}, {"decode": PoolLimits(1, 2, None)}
    )
    server = grpc.aio.server(interceptors=(BearerTokenInterceptor([TOKEN]),))
    server.add_generic_rpc_handlers((AdminServicer(controller).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    auth = (("authorization", f"Bearer {TOKEN}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdserve_pb2_grpc.AdminStub(channel)
            request = pdserve_pb2.ScaleRequest(target_replicas={"decode": 2})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Scale(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            too_many = pdserve_pb2.ScaleRequest(target_replicas={"decode": 3})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Scale(too_many, timeout=10, metadata=auth)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith('target_replicas["decode"]: 3 replicas')
            assert factory.created == {}
            response = await stub.Scale(request, timeout=10, metadata=auth)
            assert dict(response.previous_target_replicas) == {"decode": 1}
            assert dict(response.target_replicas) == {"decode": 2}
            assert list(factory.created) == ["decode-1"]
    finally:
        await server.stop(None)
        await controller.stop()


async def test_admin_scale_without_a_factory_is_a_failed_precondition() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AdminServicer(None).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pdserve_pb2_grpc.AdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Scale(pdserve_pb2.ScaleRequest(target_replicas={"decode": 2}))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await server.stop(None)
