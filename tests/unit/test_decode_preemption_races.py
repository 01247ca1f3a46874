"""DecodeWorker with on-demand KV: an abort, a dropped stream or a failed step racing a
preemption ends each stream exactly once and frees every block exactly once (leak oracle)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from engine.model_runner import SequenceChunk
from pdserve.errors import StatusCode
from tests.factories.fake_runner import FakeRunner
from tests.unit.test_decode_preemption import (
    WAIT_S,
    collect,
    ends,
    make_replica,
    step_until,
    until,
)


class FailsOnceAfter(FakeRunner):
    """Fails the first step that starts once `condition` holds (checked on the step thread)."""

    condition: Callable[[], bool] = staticmethod(lambda: False)

    def forward(self, chunks: list[SequenceChunk]) -> Any:
        if not self.fail_calls and self.condition():
            self.fail_calls = {len(self.calls) + 1}
        return super().forward(chunks)



async def test_an_abort_after_the_preemption_does_not_end_the_stream_twice() -> None:
    replica = make_replica()
    replica.reserve("a")
    replica.reserve("b")
    old = asyncio.ensure_future(collect(replica.generate("a", 100)))
    victim = replica.generate("b", 200)
    first = await asyncio.wait_for(victim.__anext__(), WAIT_S)  # b joined; not pulled further
    await until(lambda: replica.num_preemptions == 1, "b's preemption")
    assert replica.worker.abort("b")
    rest = await collect(victim)
    assert ends([first, *rest]) == [rest[-1]] and rest[-1].preempted
    assert (await old)[-1].finish_reason == "length"
    assert replica.is_quiet()


async def test_an_aborted_victim_is_cancelled_not_preempted() -> None:
    runner = FakeRunner(hold=True)
    replica = make_replica(runner)
    replica.reserve("a")
    replica.reserve("b")
    old = asyncio.ensure_future(collect(replica.generate("a", 100)))
    victim = replica.generate("b", 200)
    pending = asyncio.ensure_future(victim.__anext__())
    runner.release(6)  # both run and fill the cache: 3 blocks each from position 8 on
    await until(lambda: replica.blocks.num_free_blocks == 0, "the cache to fill")
    assert replica.worker.abort("b")
    runner.release(100)
    events = [await asyncio.wait_for(pending, WAIT_S), *await collect(victim)]
    end = ends(events)[0]
    assert end.error is not None and end.error.code is StatusCode.CANCELLED
    assert (await old)[-1].finish_reason == "length"
    assert replica.num_preemptions == 0
    assert replica.is_quiet()


async def test_dropping_a_preempted_stream_frees_nothing_twice() -> None:
    runner = FakeRunner(hold=True)
    replica = make_replica(runner)
    replica.reserve("a")
    replica.reserve("b")
    old = asyncio.ensure_future(collect(replica.generate("a", 100)))
    victim = replica.generate("b", 200)
    pending = asyncio.ensure_future(victim.__anext__())
    await step_until(runner, lambda: replica.num_preemptions == 1, "b's preemption")
    assert (await asyncio.wait_for(pending, WAIT_S)).token_ids == [201]
    replica.reserve("c", prompt=1, max_tokens=1)  # takes a block b freed
    await victim.aclose()
    assert replica.blocks.owns("c"), "b's release freed c's block"
    assert replica.worker.abort("c")
    runner.release(100)
    assert (await old)[-1].finish_reason == "length"
    assert replica.is_quiet()


async def test_a_failed_step_right_after_a_preemption_ends_each_stream_once() -> None:
    runner = FailsOnceAfter()
    replica = make_replica(runner)
    runner.condition = lambda: not replica.blocks.owns("b")  # b's blocks are freed: preempted
    replica.reserve("a")
    replica.reserve("b")
    old, new = await asyncio.gather(
        collect(replica.generate("a", 100)), collect(replica.generate("b", 200))
    )
    assert ends(new) == [new[-1]] and new[-1].preempted
    assert ends(old) == [old[-1]] and old[-1].error is not None
    assert old[-1].error.code is StatusCode.INTERNAL and "exploded" in old[-1].error.message
    assert replica.num_preemptions == 1
    assert replica.is_quiet()
