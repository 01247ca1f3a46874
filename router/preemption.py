"""Preemption by recompute, as the router sees it.

A decode (or colocated) replica whose cache cannot grow a running sequence frees the KV of
others (highest priority value, then latest `admitted_at`, first) and ends their streams with a
`preempted` event. The attempt that owned such a stream raises `Preempted`; the request flow
then starts a new attempt with prompt + every token already sent (the migration path: the
client's stream goes on with no gap and no duplicate), whatever `reliability.on_decode_failure`
says, and counts it against `reliability.max_preemptions` instead of the migrations.
"""

from __future__ import annotations

from pdserve.errors import PdserveError, ResourceExhausted, StatusCode


class Preempted(PdserveError):
    """Raised by an attempt whose replica preempted it; the attempt holds nothing any more.

    Not a `ResourceExhausted` on purpose: code that waits on (or tries the next replica after)
    RESOURCE_EXHAUSTED must not mistake a preemption for a refusal."""

    code = StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, replica_id: str) -> None:
        super().__init__(f"{replica_id} preempted the request (its KV was freed)")
        self.replica_id = replica_id


def check_preemptions(num_preemptions: int, max_preemptions: int, num_tokens_sent: int) -> None:
    """Raises `ResourceExhausted` naming the count once a request was preempted more than
    `max_preemptions` times (`reliability.max_preemptions`)."""
    if num_preemptions > max_preemptions:
        raise ResourceExhausted(
            f"request preempted {num_preemptions} times (more than "
            f"reliability.max_preemptions {max_preemptions}) after {num_tokens_sent} tokens "
            "were sent: the decode replicas are too full"
        )
