"""Waiting on a replica stream while watching the replica: a quiet stream on a healthy replica
is waited on, a replica that stopped answering, restarted or failed is lost, the deadline
ends the wait, and an event's error is raised."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pdserve.errors import (
    DeadlineExceeded,
    PdserveError,
    ResourceExhausted,
    StatusCode,
    Unavailable,
)
from pdserve.messages import DecodeEvent, LoadReport
from router.replica_pool import DEAD, READY, UNRESPONSIVE, Replica
from router.stream_watch import ReplicaLost, next_event, seconds_left

POLL_S = 0.1  # stall checks every 0.2 s of (fake) silence


class QuietStream:
    """An EventStream whose first `num_quiet` slices pass without an event, then answers with
    `then` (an event, or an error to raise). `on_quiet` runs at each quiet slice: the poller's
    view of the replica changing meanwhile."""

    def __init__(
        self,
        num_quiet: int,
        then: DecodeEvent | PdserveError,
        on_quiet: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._num_quiet = num_quiet
        self._then = then
        self._on_quiet = on_quiet
        self.timeouts: list[float] = []

    async def next(self, timeout_s: float) -> DecodeEvent:
        self.timeouts.append(timeout_s)
        if len(self.timeouts) <= self._num_quiet:
            self._on_quiet(len(self.timeouts))
            raise DeadlineExceeded("no event yet")
        if isinstance(self._then, PdserveError):
            raise self._then
        return self._then


def load_report(epoch: str) -> LoadReport:
    return LoadReport(
        replica_id="decode-0", role="decode", pid=1, node_id="n", num_active_requests=1,
        num_waiting_requests=0, num_free_blocks=1, num_total_blocks=2, epoch=epoch,
    )


def ready_replica() -> Replica:
    return Replica("decode-0", handle=None, state=READY, load=load_report("e1"))


async def watch(stream: QuietStream, replica: Replica, deadline_in_s: float = 60.0) -> object:
    return await next_event(
        stream, replica, "e1", time.time() + deadline_in_s, POLL_S  # type: ignore[arg-type]
    )


async def test_a_quiet_stream_on_a_healthy_replica_is_waited_on() -> None:
    event = DecodeEvent(token_ids=[7])
    stream = QuietStream(3, event)
    assert await watch(stream, ready_replica()) is event
    assert len(stream.timeouts) == 4
    assert all(timeout == pytest.approx(0.2) for timeout in stream.timeouts)


@pytest.mark.parametrize("state", [UNRESPONSIVE, DEAD])
async def test_a_replica_that_stopped_answering_polls_is_lost(state: str) -> None:
    replica = ready_replica()

    def poller_marks(num_quiet: int) -> None:
        if num_quiet == 2:
            replica.state = state

    stream = QuietStream(10, DecodeEvent(), poller_marks)
    with pytest.raises(ReplicaLost, match=f"stopped responding \\({state}\\)") as lost:
        await watch(stream, replica)
    assert lost.value.replica is replica and len(stream.timeouts) == 2


async def test_a_restarted_replica_is_lost() -> None:
    replica = ready_replica()

    def restarted(num_quiet: int) -> None:
        replica.load = load_report("e2")

    with pytest.raises(ReplicaLost, match="restarted"):
        await watch(QuietStream(5, DecodeEvent(), restarted), replica)


async def test_a_failed_stream_loses_the_replica() -> None:
    stream = QuietStream(0, Unavailable("decode-0.generate: replica died"))
    with pytest.raises(ReplicaLost, match="failed: decode-0.generate: replica died"):
        await watch(stream, ready_replica())


async def test_an_event_error_is_raised_and_unavailable_means_lost() -> None:
    reported = DecodeEvent(error=Unavailable("receiver gone").to_info())
    with pytest.raises(ReplicaLost, match="reported: receiver gone"):
        await watch(QuietStream(0, reported), ready_replica())
    refused = DecodeEvent(error=ResourceExhausted("no blocks").to_info())
    with pytest.raises(ResourceExhausted, match="no blocks"):
        await watch(QuietStream(1, refused), ready_replica())


async def test_the_deadline_ends_the_wait() -> None:
    # Less time left than one stall check: the quiet slice is the last one.
    stream = QuietStream(10, DecodeEvent())
    with pytest.raises(DeadlineExceeded) as exceeded:
        await watch(stream, ready_replica(), deadline_in_s=0.1)
    assert exceeded.value.code is StatusCode.DEADLINE_EXCEEDED
    assert len(stream.timeouts) == 1 and stream.timeouts[0] <= 0.1
    with pytest.raises(DeadlineExceeded):
        seconds_left(time.time() - 1)
