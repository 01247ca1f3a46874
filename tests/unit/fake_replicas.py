"""Scripted replica actors for attempt-level router tests (no Ray).

A `FakeActor` answers `reserve`, `load`, `abort` and `mark_reader` like a replica's actor
handle (`.remote()` returns an awaitable of msgpack bytes) and plays scripted event streams
for `prefill` and `generate`. `FakeEventStream` replaces `router.ray_calls.EventStream` in the
attempt modules (tests monkeypatch it in): it plays the actor's script instead of reading Ray
refs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from pdserve.errors import PdserveError, Unavailable
from pdserve.messages import (
    ColocatedRequest,
    DecodeRequest,
    LoadReport,
    PrefillRequest,
    ReserveReply,
    ReserveRequest,
    decode,
    encode,
)
from router.replica_pool import ReplicaPool


class _Method:
    """An actor method: `.remote(*args)` runs `fn` at once (as a fire-and-forget call reaches
    the actor even if nobody awaits it) and returns an awaitable of its result."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        answer = asyncio.get_running_loop().create_future()
        answer.set_result(self._fn(*args))
        return answer


class StreamMethod:
    """A streaming actor method: each opening decodes its request and plays the next script
    (a list of events; the last script repeats)."""

    def __init__(self, request_type: type, scripts: list[list[Any]] | None = None) -> None:
        self._request_type = request_type
        self.scripts = scripts or []
        self.requests: list[Any] = []

    def open(self, request: bytes) -> list[Any]:
        self.requests.append(decode(self._request_type, request))
        if len(self.scripts) > 1:
            return list(self.scripts.pop(0))
        return list(self.scripts[0]) if self.scripts else []


class FakeActor:
    def __init__(self, replica_id: str, role: str, num_free_blocks: int = 10) -> None:
        self.replica_id = replica_id
        self.role = role
        self.num_free_blocks = num_free_blocks
        # Each reserve call takes the next reply; the last one repeats.
        self.reserve_replies: list[ReserveReply] = [ReserveReply(ok=True, kv_address="kv")]
        self.reserve_requests: list[ReserveRequest] = []
        self.aborted: list[str] = []
        self.reserve = _Method(self._reserve)
        self.load = _Method(self._load)
        self.abort = _Method(self.aborted.append)
        # (transfer id, stalled) of each `mark_reader` call, in order.
        self.reader_marks: list[tuple[str, bool]] = []
        self.mark_reader = _Method(lambda transfer_id, stalled: self.reader_marks.append(
            (transfer_id, stalled)
        ))
        self.prefill = StreamMethod(PrefillRequest)
        self.generate = StreamMethod(ColocatedRequest if role == "colocated" else DecodeRequest)

    def refuse_reservations(self, error: PdserveError) -> None:
        self.reserve_replies = [ReserveReply(ok=False, error=error.to_info())]

    def _reserve(self, request: bytes) -> bytes:
        self.reserve_requests.append(decode(ReserveRequest, request))
        reply = self.reserve_replies[0]
        if len(self.reserve_replies) > 1:
            self.reserve_replies.pop(0)
        return encode(reply)

    def _load(self) -> bytes:
        return encode(
            LoadReport(
                replica_id=self.replica_id, role=self.role, pid=1, node_id="node",
                num_active_requests=0, num_waiting_requests=0,
                num_free_blocks=self.num_free_blocks, num_total_blocks=100, epoch="e1",
            )
        )


class FakeEventStream:
    """Stands in for `router.ray_calls.EventStream`: plays the method's script."""

    def __init__(self, method: StreamMethod, event_type: type, request: bytes, what: str) -> None:
        self._events = method.open(request)
        self._what = what
        self.closed = False

    async def next(self, timeout_s: float) -> Any:
        if not self._events:
            raise Unavailable(f"{self._what}: stream ended early")
        return self._events.pop(0)

    def close(self) -> None:
        self.closed = True


def use_fake_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("router.attempt", "router.colocated_attempt"):
        monkeypatch.setattr(f"{module}.EventStream", FakeEventStream)


async def make_pool(role: str, actors: list[FakeActor]) -> ReplicaPool:
    """A pool of `actors`, polled once (all READY)."""
    pool = ReplicaPool(role, poll_interval_s=60.0, poll_timeout_s=5.0)
    for actor in actors:
        pool.add(actor.replica_id, actor)
    await pool.poll_once()
    return pool
