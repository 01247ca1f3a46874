"""When and how the front door admitted one client request.

One `Admission` per client request, made by `FrontDoor.generate` and shared by every choice
and every attempt of it (retries, migrations, re-prefills after a preemption): `admitted_at`
is what the router queue and the decode replicas order it by, so it must not change; `reader`
says whether its client reads its stream, which the decode replicas order it by first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router.reader_pace import ReaderPace


@dataclass(frozen=True)
class Admission:
    # Wall clock (time.time()) when the front door took the request in, before any queueing.
    # With the request's priority it orders the router queue, and reversed, which sequences a
    # full decode replica preempts first.
    admitted_at: float
    # time.monotonic() at the same moment: time to first token and total time count from it.
    started: float
    # Seconds the request waited in the router queue for in-flight slots.
    queued_s: float = 0.0
    # Set by the request's `ClientStream`; every attempt tells its replica (`tell`).
    reader: ReaderPace = field(default_factory=ReaderPace)

    @classmethod
    def now(cls) -> Admission:
        """An admission at this moment that did not queue (a flow run without a front door)."""
        return cls(admitted_at=time.time(), started=time.monotonic())


class AdmissionClock:
    """Hands out strictly increasing `admitted_at` values, so that the router queue keeps
    arrival order even if the wall clock steps back. Event loop only."""

    def __init__(self) -> None:
        self._last = 0.0

    def next(self) -> float:
        self._last = max(time.time(), self._last + 1e-6)
        return self._last
