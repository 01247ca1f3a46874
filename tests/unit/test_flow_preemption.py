"""The request flow after a preemption: a new attempt re-prefills prompt + the tokens sent, the
client's stream has no gap and no duplicate, whatever `on_decode_failure` says; preemptions are
counted per request (and in the metrics), and one past `max_preemptions` fails the request with
RESOURCE_EXHAUSTED naming the count. Attempts are scripted stand-ins (no replicas)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from pdserve.errors import ResourceExhausted, Unavailable
from pdserve.messages import SamplingParams
from pdserve.metrics import RouterMetrics
from router.admission import Admission
from router.attempt import AttemptReport, TokenEvent
from router.preemption import Preempted
from router.replica_pool import ReplicaPool
from router.request_flow import RequestFlow, StreamChunk
from router.validation import ValidatedRequest
from tests.factories.config import make_config
from tests.factories.fake_flow import router_tokenizer

TOKENIZER = router_tokenizer()
PROMPT = [5, 6, 7]
REPLY = TOKENIZER.encode("Hello, world! How are you today?", add_special_tokens=False)
PREEMPT = "preempt"
# A plan ending like this raises UNAVAILABLE that is not a lost replica (no live pool left).
NO_LIVE_POOL = "no live pool"


class ScriptedAttempt:
    """Yields its share of REPLY (a slice), then is preempted or finishes."""

    def __init__(self, share: list[int], then: str, previous: list[int], **kwargs: Any) -> None:
        self.share = share
        self.then = then
        self.previous = list(previous)
        self.kwargs = kwargs
        self.closed = False
        self.report = AttemptReport(
            timings={"queue_s": 0.5, "prefill_s": 0.25, "decode_s": 1.0},
            prefill_replica="prefill-0", decode_replica="decode-0", kv_transport="grpc",
            queued_s=0.125,
        )

    async def tokens(self) -> AsyncGenerator[TokenEvent, None]:
        for index, token in enumerate(self.share):
            last = index == len(self.share) - 1
            finish = self.then if last and self.then not in (PREEMPT, NO_LIVE_POOL) else ""
            yield TokenEvent([token], finish)
        if self.then == PREEMPT:
            raise Preempted("decode-0")
        if self.then == NO_LIVE_POOL:
            raise Unavailable("no live decode replica")

    def close(self) -> None:
        self.closed = True


class AttemptScript:
    """Stands in for `router.request_flow.Attempt`: attempt i plays plans[i]."""

    def __init__(self, plans: list[tuple[int, str]]) -> None:
        self._plans = plans
        self.attempts: list[ScriptedAttempt] = []

    def __call__(
        self, config: Any, pools: Any, eos: Any, request: ValidatedRequest, previous: list[int],
        request_id: str, deadline: float, metrics: Any, **kwargs: Any,
    ) -> ScriptedAttempt:
        start = len(previous)
        num_tokens, then = self._plans[len(self.attempts)]
        attempt = ScriptedAttempt(REPLY[start:start + num_tokens], then, previous, **kwargs)
        self.attempts.append(attempt)
        return attempt


def make_flow(
    monkeypatch: pytest.MonkeyPatch, plans: list[tuple[int, str]], **reliability: Any
) -> tuple[RequestFlow, AttemptScript, RouterMetrics]:
    config = make_config("unused", reliability=reliability)
    script = AttemptScript(plans)
    monkeypatch.setattr("router.request_flow.Attempt", script)
    metrics = RouterMetrics()
    pools = ReplicaPool("prefill", 1.0, 1.0), ReplicaPool("decode", 1.0, 1.0)
    return RequestFlow(config, TOKENIZER, *pools, metrics), script, metrics


def request(priority: int = 0) -> ValidatedRequest:
    return ValidatedRequest(
        PROMPT, SamplingParams(max_tokens=len(REPLY)), [], None, priority=priority
    )


async def stream(flow: RequestFlow, admission: Admission | None = None) -> list[StreamChunk]:
    return [
        chunk async for chunk in flow.run(request(), time.time() + 60, "req-1", admission)
    ]


async def test_a_preempted_request_is_re_prefilled_with_the_tokens_sent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    flow, script, metrics = make_flow(
        monkeypatch, [(3, PREEMPT), (4, PREEMPT), (len(REPLY), "length")],
        on_decode_failure="fail",  # preemption re-prefills whatever this says
    )
    admission = Admission(admitted_at=1234.5, started=time.monotonic(), queued_s=0.25)
    with caplog.at_level(logging.INFO, logger="router.request_flow"):
        chunks = await stream(flow, admission)
    sent = [token for chunk in chunks for token in chunk.token_ids]
    assert sent == REPLY, "no gap, no duplicate"
    assert "".join(chunk.text for chunk in chunks) == TOKENIZER.decode(REPLY)
    assert [a.previous for a in script.attempts] == [[], REPLY[:3], REPLY[:7]]
    assert all(a.closed for a in script.attempts)
    assert {a.kwargs["admitted_at"] for a in script.attempts} == {1234.5}
    assert len({id(a.kwargs["wait_queue"]) for a in script.attempts}) == 1
    completion = chunks[-1].completion
    assert completion is not None
    assert completion.num_preemptions == 2 and completion.num_migrations == 0
    assert completion.finish_reason == "length"
    # Front door 0.25 + three attempts' router queue waits + the last prefill queue.
    assert completion.timings["queue_s"] == pytest.approx(0.25 + 3 * 0.125 + 0.5)
    assert metrics.preemptions._value.get() == 2
    assert metrics.migrations._value.get() == 0
    preempted_logs = [r for r in caplog.records if "preempted" in r.getMessage()]
    assert len(preempted_logs) == 2 and all("req-1" in r.getMessage() for r in preempted_logs)


async def test_past_max_preemptions_the_request_fails_naming_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flow, script, metrics = make_flow(
        monkeypatch, [(2, PREEMPT), (2, PREEMPT), (2, PREEMPT)], max_preemptions=2
    )
    received: list[int] = []
    with pytest.raises(ResourceExhausted) as info:
        async for chunk in flow.run(request(), time.time() + 60, "req-2"):
            received += chunk.token_ids
    assert "preempted 3 times" in info.value.message
    assert "max_preemptions 2" in info.value.message
    assert received == REPLY[:6]
    assert len(script.attempts) == 3 and all(a.closed for a in script.attempts)
    assert metrics.preemptions._value.get() == 3


async def test_zero_max_preemptions_fails_on_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    flow, script, _ = make_flow(monkeypatch, [(1, PREEMPT)], max_preemptions=0)
    with pytest.raises(ResourceExhausted, match="preempted 1 times"):
        await stream(flow)
    assert len(script.attempts) == 1


async def test_a_request_never_preempted_reports_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    flow, script, _ = make_flow(monkeypatch, [(len(REPLY), "length")])
    chunks = await stream(flow)
    completion = chunks[-1].completion
    assert completion is not None and completion.num_preemptions == 0
    assert completion.timings["queue_s"] == pytest.approx(0.125 + 0.5)
    assert script.attempts[0].kwargs["admitted_at"] > 0
