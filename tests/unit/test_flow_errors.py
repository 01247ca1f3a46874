"""A request that fails after tokens reached its client says how many it got, whatever ended
it (here: the re-prefill after a preemption finds no live decode replica); the error objects
themselves are not changed, as one may end several requests."""

from __future__ import annotations

import time

import pytest

from pdserve.errors import Unavailable
from tests.unit.test_flow_preemption import NO_LIVE_POOL, PREEMPT, REPLY, make_flow, request


async def test_a_failure_after_tokens_says_how_many_were_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow, script, _ = make_flow(monkeypatch, [(3, PREEMPT), (2, NO_LIVE_POOL)])
    received: list[int] = []
    with pytest.raises(Unavailable) as info:
        async for chunk in flow.run(request(), time.time() + 60, "req-1"):
            received += chunk.token_ids
    assert received == REPLY[:5]
    assert info.value.message == "no live decode replica after 5 tokens were sent"
    assert all(attempt.closed for attempt in script.attempts)


async def test_a_failure_before_any_token_is_left_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow, _, _ = make_flow(monkeypatch, [(0, NO_LIVE_POOL)])
    with pytest.raises(Unavailable) as info:
        async for _ in flow.run(request(), time.time() + 60, "req-2"):
            pass
    assert info.value.message == "no live decode replica"


def test_with_message_copies_the_error_and_leaves_it_unchanged() -> None:
    shared = Unavailable("the server is shutting down")
    copy = shared.with_message("the server is shutting down after 2 tokens were sent")
    assert type(copy) is Unavailable and copy.code is shared.code
    assert shared.message == "the server is shutting down" and str(copy) == copy.message
