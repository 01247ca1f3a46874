"""stream_choices: n independent runs of the flow, choice 0 first so the others find its
prompt blocks cached, distinct seeds, and one failure or an early close ends every run."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from pdserve.errors import ResourceExhausted, Unavailable
from pdserve.messages import SamplingParams
from router.choices import stream_choices
from router.request_flow import StreamChunk
from router.validation import ValidatedRequest
from tests.factories.fake_flow import ScriptedFlow, router_tokenizer

TOKENIZER = router_tokenizer()


def request(num_choices: int, seed: int | None = 7) -> ValidatedRequest:
    sampling = SamplingParams(max_tokens=8, temperature=0.7, seed=seed)
    return ValidatedRequest([5, 6, 7], sampling, [], None, num_choices=num_choices)


async def test_other_choices_start_after_the_first_token_of_choice_0() -> None:
    flow = ScriptedFlow(TOKENIZER)
    runs_at_first_chunk = None
    finished = set()
    async for item in stream_choices(flow, request(3), time.time() + 60, "req"):
        if runs_at_first_chunk is None:
            assert item.index == 0
            runs_at_first_chunk = len(flow.runs)
        if item.chunk.completion is not None:
            finished.add(item.index)
    assert runs_at_first_chunk == 1
    assert finished == {0, 1, 2}
    assert [run.request_id for run in flow.runs] == ["req-0", "req-1", "req-2"]
    assert [run.request.sampling.seed for run in flow.runs] == [7, 8, 9]
    assert all(run.outcome == "finished" for run in flow.runs)


async def test_one_choice_keeps_the_request_id_and_seed() -> None:
    flow = ScriptedFlow(TOKENIZER)
    items = [item async for item in stream_choices(flow, request(1), time.time() + 60, "req")]
    assert {item.index for item in items} == {0}
    assert [(run.request_id, run.request.sampling.seed) for run in flow.runs] == [("req", 7)]


async def test_unseeded_choices_stay_unseeded() -> None:
    flow = ScriptedFlow(TOKENIZER)
    async for _ in stream_choices(flow, request(2, seed=None), time.time() + 60, "req"):
        pass
    assert [run.request.sampling.seed for run in flow.runs] == [None, None]


async def test_choice_0_failing_before_its_first_token_starts_no_other() -> None:
    flow = ScriptedFlow(TOKENIZER, fail_before_first=ResourceExhausted("full"))
    with pytest.raises(ResourceExhausted):
        async for _ in stream_choices(flow, request(3), time.time() + 60, "req"):
            pass
    assert [run.outcome for run in flow.runs] == ["failed"]


async def test_a_failing_choice_ends_the_others() -> None:
    flow = ScriptedFlow(TOKENIZER, fail_after_tokens=3, fail_error=Unavailable("gone"))
    with pytest.raises(Unavailable):
        async for _ in stream_choices(flow, request(3), time.time() + 60, "req"):
            pass
    assert flow.num_running == 0
    assert "failed" in {run.outcome for run in flow.runs}


async def test_closing_early_closes_every_run() -> None:
    flow = ScriptedFlow(TOKENIZER)
    chunks = stream_choices(flow, dataclasses.replace(request(3)), time.time() + 60, "req")
    seen = 0
    async for item in chunks:
        seen += item.index > 0
        if seen:
            break
    await chunks.aclose()
    assert len(flow.runs) == 3
    assert flow.num_running == 0


class EndlessFlow:
    """A flow whose every run streams one-token chunks for as long as they are read."""

    def __init__(self) -> None:
        self.num_produced = 0
        # Runs started and not closed yet.
        self.num_open = 0

    async def run(self, request, deadline, request_id=None, admission=None):  # noqa: ANN001
        self.num_open += 1
        try:
            while True:
                self.num_produced += 1
                yield StreamChunk([5], "x")
        finally:
            self.num_open -= 1


async def test_choices_stop_reading_their_flows_once_the_buffer_is_full() -> None:
    flow = EndlessFlow()
    chunks = stream_choices(
        flow, request(3), time.time() + 60, "req", max_buffered=4  # type: ignore[arg-type]
    )
    await anext(chunks)  # choice 0's first chunk starts the other two
    for _ in range(200):  # let every pump run as far as it can
        await asyncio.sleep(0)
    # 4 buffered, plus at most one chunk in hand per choice, plus the one consumed.
    assert flow.num_produced <= 4 + 3 + 1
    await chunks.aclose()


@pytest.mark.parametrize("num_choices", [1, 3])
async def test_closing_closes_every_run_at_once_even_those_waiting_for_room(
    num_choices: int,
) -> None:
    # A run left open would be closed only by the garbage collector, and its clean-up is what
    # aborts the request's work on the replicas.
    flow = EndlessFlow()
    chunks = stream_choices(
        flow, request(num_choices), time.time() + 60, "req", max_buffered=2,  # type: ignore[arg-type]
    )
    await anext(chunks)
    for _ in range(200):  # every pump runs until the buffer is full
        await asyncio.sleep(0)
    assert flow.num_open == num_choices
    await chunks.aclose()
    assert flow.num_open == 0
