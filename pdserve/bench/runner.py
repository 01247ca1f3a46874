"""The load generator's engine: dispatches requests on one asyncio loop and records each stream.

All requests share one backend connection (a `grpc.aio` channel or an aiohttp session, see
`pdserve.bench.backends`); every request is a task, so thousands can be in flight without
threads and the client stays far below the cost of a decode step. Times are
`time.perf_counter()` seconds since the run started, stamped as each message is read.

Main requests come from the open loop (Poisson send times, not waiting for responses) or the
closed loop (C workers, each sending its next request when its previous one ends). With the mix
on, a second task sends one long-prompt request per period while the main process dispatches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bench.arrivals import periodic_arrivals, poisson_arrivals
from pdserve.bench.backends import Backend
from pdserve.bench.options import BenchOptions
from pdserve.bench.records import RequestRecord
from pdserve.bench.workload import RequestShape, Workload, seeded_rng


@dataclass
class RunOutcome:
    """The records of every request sent (in send order), the measured window (start to the
    last request's end) and when the long prompts went (seconds since the start)."""

    records: list[RequestRecord]
    elapsed_s: float
    long_arrivals_s: list[float]
    started_unix_s: float  # wall clock at the start, to line up with server logs and metrics


class LoadRunner:
    """One run against `backend`. `run()` must be awaited once, on the loop that owns the
    backend's connection; it returns when every dispatched request has ended and raises nothing
    for failed requests (they are recorded with their status). `on_done` is called on the loop
    with each finished record (for progress display)."""

    def __init__(
        self,
        backend: Backend,
        options: BenchOptions,
        main: Workload,
        long: Workload | None,
        *,
        on_done: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self._backend = backend
        self._options = options
        self._main = main
        self._long = long
        self._on_done = on_done
        self._records: list[RequestRecord] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._num_main_claimed = 0
        self._long_arrivals_s: list[float] = []
        self._t0 = 0.0
        self._dispatch_done: asyncio.Event | None = None

    async def run(self) -> RunOutcome:
        self._dispatch_done = asyncio.Event()
        started_unix_s = time.time()
        self._t0 = time.perf_counter()
        # The long loop starts first so a long prompt due at 0 goes even when the main
        # process dispatches everything at once.
        long_task = asyncio.create_task(self._long_loop()) if self._long is not None else None
        try:
            if self._options.concurrency is not None:
                await self._closed_loop(self._options.concurrency)
            else:
                await self._open_loop()
        finally:
            self._dispatch_done.set()
        if long_task is not None:
            await long_task
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight))
        return RunOutcome(self._records, self._now(), self._long_arrivals_s, started_unix_s)

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _claim_main(self, at_s: float) -> bool:
        """Whether a main request may go at `at_s` under both bounds; counts it if so. Runs
        without awaiting, so concurrent workers cannot both take the last slot."""
        limit = self._options.max_main_requests
        if limit is not None and self._num_main_claimed >= limit:
            return False
        duration_s = self._options.duration_s
        if duration_s is not None and at_s >= duration_s:
            return False
        self._num_main_claimed += 1
        return True

    async def _open_loop(self) -> None:
        assert self._options.rate_per_s is not None, "open loop needs a rate"
        rng = seeded_rng(self._options.seed, "arrivals")
        for at_s in poisson_arrivals(self._options.rate_per_s, rng):
            if not self._claim_main(at_s):
                return
            delay_s = at_s - self._now()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            self._spawn(self._main.next_shape(), at_s)

    async def _closed_loop(self, concurrency: int) -> None:
        await asyncio.gather(*(self._closed_worker() for _ in range(concurrency)))

    async def _closed_worker(self) -> None:
        while self._claim_main(now_s := self._now()):
            shape = self._main.next_shape()
            await self._send(self._new_record(shape, now_s), shape)

    async def _long_loop(self) -> None:
        assert self._long is not None and self._options.long_every_s is not None, "mix is off"
        assert self._dispatch_done is not None, "called outside run()"
        for at_s in periodic_arrivals(self._options.long_every_s, self._options.first_long_s):
            if self._dispatch_done.is_set():
                return
            delay_s = at_s - self._now()
            if delay_s > 0:
                try:
                    await asyncio.wait_for(self._dispatch_done.wait(), timeout=delay_s)
                    return  # the main process finished first
                except asyncio.TimeoutError:
                    pass
            self._long_arrivals_s.append(self._now())
            self._spawn(self._long.next_shape(), at_s)

    def _new_record(self, shape: RequestShape, scheduled_s: float) -> RequestRecord:
        record = RequestRecord(
            index=len(self._records),
            kind=shape.kind,
            max_tokens=shape.max_tokens,
            scheduled_s=scheduled_s,
            num_prompt_tokens=shape.num_prompt_tokens,
        )
        self._records.append(record)
        return record

    def _spawn(self, shape: RequestShape, scheduled_s: float) -> None:
        task = asyncio.create_task(self._send(self._new_record(shape, scheduled_s), shape))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, record: RequestRecord, shape: RequestShape) -> None:
        await self._backend.stream(record, shape, self._now)
        if self._on_done is not None:
            self._on_done(record)
