"""Several independent sequences for one prompt (OpenAI's `n`), streamed as one.

Each choice is its own run of the request flow (its own placement, KV and retries). Choice 0
starts first and the others once it has its first token: by then the prefill replica has
cached the prompt's full blocks, so the other choices prefill only the prompt's last partial
block instead of computing the whole prompt n times (when they land on the same prefill
replica, which least-loaded placement makes likely but does not promise). A seeded request
gives choice i the seed `seed + i`, so the choices differ and the whole response still repeats.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from router.admission import Admission
from router.request_flow import RequestFlow, StreamChunk
from router.validation import SEED_MODULUS, ValidatedRequest


@dataclass(frozen=True)
class ChoiceChunk:
    """A chunk of choice `index`'s stream."""

    index: int
    chunk: StreamChunk


@dataclass(frozen=True)
class _ChoiceEnded:
    index: int
    error: BaseException | None = None


def choice_request(request: ValidatedRequest, index: int) -> ValidatedRequest:
    """The request choice `index` runs: the same, with seed + index when seeded."""
    seed = request.sampling.seed
    if index == 0 or seed is None:
        return request
    sampling = dataclasses.replace(request.sampling, seed=(seed + index) % SEED_MODULUS)
    return dataclasses.replace(request, sampling=sampling)


def choice_request_id(request_id: str, index: int, num_choices: int) -> str:
    """The request id choice `index`'s flow carries: `<request_id>-<index>`, or just
    `request_id` for a request with one choice."""
    return request_id if num_choices == 1 else f"{request_id}-{index}"


async def stream_choices(
    flow: RequestFlow,
    request: ValidatedRequest,
    deadline: float,
    request_id: str,
    admission: Admission | None = None,
    max_buffered: int = 0,
) -> AsyncGenerator[ChoiceChunk, None]:
    """Runs the request's choices (choice 0 first, the others from its first token) and
    yields their chunks as they come.

    Choice i's flow carries request id `<request_id>-<i>` (just `request_id` for one choice);
    every choice shares the front door's `admission` (one made now when None), so they queue
    and are preempted as one request.
    The first choice to fail fails the whole stream: the others are cancelled (which aborts
    their work on the replicas) before its error is raised. Closing the generator early
    cancels every choice the same way. At most `max_buffered` chunks (0: no bound) wait for
    the consumer; beyond that the choices stop reading from their replicas."""
    admission = admission or Admission.now()
    if request.num_choices == 1:
        # Closed here, not left to the garbage collector: its clean-up aborts the replicas' work.
        async with aclosing(flow.run(request, deadline, request_id, admission)) as chunks:
            async for chunk in chunks:
                yield ChoiceChunk(0, chunk)
        return
    queue: asyncio.Queue[ChoiceChunk | _ChoiceEnded] = asyncio.Queue(maxsize=max_buffered)

    def start(index: int) -> asyncio.Task[None]:
        choice = choice_request(request, index)
        return asyncio.create_task(
            _pump(
                flow, choice, deadline, choice_request_id(request_id, index, request.num_choices),
                admission, index, queue,
            )
        )

    tasks = [start(0)]
    try:
        num_ended = 0
        while num_ended < request.num_choices:
            item = await queue.get()
            if isinstance(item, _ChoiceEnded) and item.error is not None:
                raise item.error
            if len(tasks) == 1:
                # Choice 0's first token (or its end): its prompt blocks are cached now.
                tasks += [start(index) for index in range(1, request.num_choices)]
            if isinstance(item, ChoiceChunk):
                yield item
            else:
                num_ended += 1
    finally:
        for task in tasks:
            task.cancel()
        # Each choice's own clean-up (aborts on the replicas) runs before this returns.
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    flow: RequestFlow,
    request: ValidatedRequest,
    deadline: float,
    request_id: str,
    admission: Admission,
    index: int,
    queue: asyncio.Queue[ChoiceChunk | _ChoiceEnded],
) -> None:
    try:
        # A cancel while the queue is full lands in `put`: the run is closed here all the same.
        async with aclosing(flow.run(request, deadline, request_id, admission)) as chunks:
            async for chunk in chunks:
                await queue.put(ChoiceChunk(index, chunk))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # handed to the consumer, which raises it
        await queue.put(_ChoiceEnded(index, exc))
        return
    await queue.put(_ChoiceEnded(index))
