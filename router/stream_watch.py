"""Waiting for a replica stream's next event while watching the replica itself.

A replica that died, restarted or stopped answering the router's load polls may leave its
stream silent instead of failing it (a SIGSTOPped process, a hung event loop). So the wait is
cut into slices of a couple of poll intervals; after each quiet slice the replica's state and
epoch, as the pool's poller last saw them, decide between waiting on and `ReplicaLost`.
Used by `router.attempt` and `router.colocated_attempt`; event loop only.
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.errors import DeadlineExceeded, Unavailable, error_from_info
from router.ray_calls import EventStream
from router.replica_pool import DEAD, UNRESPONSIVE, Replica


class ReplicaLost(Unavailable):
    """A replica serving the attempt died or stopped answering."""

    def __init__(self, replica: Replica, why: str) -> None:
        super().__init__(f"{replica.replica_id} {why}")
        self.replica = replica


async def next_event(
    stream: EventStream,
    replica: Replica,
    placed_epoch: str,
    deadline: float,
    poll_interval_s: float,
) -> Any:
    """The stream's next event (an `*Event` message with an `error` field). Blocks (awaits)
    until it comes or `deadline` (wall clock) passes.

    Raises the event's error; ReplicaLost when the replica died, restarted (its epoch is no
    longer `placed_epoch`), stopped answering the polls made every `poll_interval_s`, or
    reported itself UNAVAILABLE; DeadlineExceeded when the deadline passes first."""
    stall_check_s = max(0.2, 2 * poll_interval_s)
    while True:
        left = seconds_left(deadline)
        try:
            event = await stream.next(min(left, stall_check_s))
        except DeadlineExceeded:
            if replica.state in (UNRESPONSIVE, DEAD):
                raise ReplicaLost(replica, f"stopped responding ({replica.state})") from None
            if replica.epoch != placed_epoch:
                raise ReplicaLost(replica, "restarted") from None
            if left > stall_check_s:
                continue  # a quiet stream on a healthy replica: keep waiting
            raise
        except Unavailable as exc:
            raise ReplicaLost(replica, f"failed: {exc.message}") from None
        if event.error is not None:
            error = error_from_info(event.error)
            if isinstance(error, Unavailable):
                raise ReplicaLost(replica, f"reported: {error.message}")
            raise error
        return event


def control_call_timeout(deadline: float, num_replicas_left: int, cap_s: float) -> float:
    """How long to wait for one replica's answer to a control call: at most `cap_s`
    (`timeouts.control_call_s`) and at most an equal share of the time left for each of the
    `num_replicas_left` replicas the request may still try, this one included. Raises
    DeadlineExceeded once the deadline has passed."""
    return min(cap_s, seconds_left(deadline) / max(1, num_replicas_left))


def seconds_left(deadline: float) -> float:
    """Seconds until `deadline` (wall clock); raises DeadlineExceeded once it has passed."""
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded")
    return left
