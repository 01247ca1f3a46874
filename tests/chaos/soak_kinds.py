"""The kinds of request the soak sends, how often, and the outcomes each may end with.

Every kind may meet a replica fault (kill, stall) or preemption on its way, so UNAVAILABLE
(no live replica after the retries) and RESOURCE_EXHAUSTED (preempted too often) are allowed
wherever a request reaches the replicas; anything else (INTERNAL, UNKNOWN) fails the soak.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_REPLICA_FAULTS = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class Kind:
    name: str
    # Share of the requests of this kind.
    share: float
    allowed: frozenset[str]


_KINDS = (
    Kind("plain", 0.35, frozenset({"OK"}) | _REPLICA_FAULTS),
    # Up to 400 tokens, preempted and re-prefilled under faults: may outlive its 60 s.
    Kind("long", 0.35, frozenset({"OK", "DEADLINE_EXCEEDED"}) | _REPLICA_FAULTS),
    Kind("corrupt_kv", 0.10, frozenset({"OK", "DATA_LOSS"}) | _REPLICA_FAULTS),
    Kind("short_deadline", 0.05, frozenset({"OK", "DEADLINE_EXCEEDED"}) | _REPLICA_FAULTS),
    Kind("cancel", 0.10, frozenset({"CANCELLED"}) | _REPLICA_FAULTS),
    Kind("huge_prompt", 0.03, frozenset({"INVALID_ARGUMENT"})),
    # Hangs up itself: the router cancels its request server-side (counted in the metrics).
    Kind("slow_reader", 0.02, frozenset({"HUNG_UP"})),
)
KINDS = {kind.name: kind for kind in _KINDS}
assert abs(sum(kind.share for kind in _KINDS) - 1.0) < 1e-9, "shares must add up to 1"


def pick_kind(rng: random.Random) -> Kind:
    """A kind, drawn by its share."""
    roll = rng.random()
    for kind in _KINDS:
        if roll < kind.share:
            return kind
        roll -= kind.share
    return _KINDS[-1]
