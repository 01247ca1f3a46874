"""The one request path behind both public APIs (gRPC `Generate` and the OpenAI HTTP API).

Each API is a thin adapter: it turns its wire format into a `GenerateInput`, then calls
`validate`, `deadline` and `generate` here, and maps the `PdserveError`s they raise to its own
statuses. What is decided here is decided once for both: validation (chat rendering and
tokenizing included), the deadline policy, admission (drain, in-flight cap) and the flow.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator

from pdserve.config import PdserveConfig
from pdserve.errors import ResourceExhausted, Unavailable
from pdserve.metrics import RouterMetrics
from router.choices import ChoiceChunk, stream_choices
from router.generate_input import GenerateInput
from router.request_flow import RequestFlow
from router.tokenizer import RouterTokenizer
from router.validation import ValidatedRequest, validate_request


def new_request_id() -> str:
    """A globally unique request id (never the client's)."""
    return uuid.uuid4().hex


class FrontDoor:
    """Validates, admits and runs requests for the public APIs.

    Owns the in-flight count and the draining flag; lives on the router's event loop (every
    method is called from it). `generate` raises `ResourceExhausted` when admitting the request
    would pass `router.max_inflight_requests` and `Unavailable` while draining."""

    def __init__(
        self,
        config: PdserveConfig,
        tokenizer: RouterTokenizer,
        flow: RequestFlow,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._flow = flow
        self.max_context_tokens = min(
            config.model.max_context_tokens, tokenizer.max_context_tokens
        )
        # Sequences admitted and not yet finished (a request with n choices counts n).
        self.num_inflight = 0
        (metrics or RouterMetrics()).watch_inflight(lambda: self.num_inflight)
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def tokenizer(self) -> RouterTokenizer:
        return self._tokenizer

    @property
    def draining(self) -> bool:
        return self._draining

    def validate(self, request: GenerateInput) -> ValidatedRequest:
        """See `router.validation.validate_request`; raises `InvalidArgument`."""
        return validate_request(
            request, self._tokenizer, self._config.limits, self.max_context_tokens
        )

    def deadline(self, client_timeout_s: float | None) -> float:
        """Wall-clock deadline: the client's timeout capped by config; the default if unset."""
        timeouts = self._config.timeouts
        seconds = timeouts.default_deadline_s if client_timeout_s is None else client_timeout_s
        return time.time() + min(seconds, timeouts.max_deadline_s)

    async def generate(
        self, request: ValidatedRequest, deadline: float, request_id: str
    ) -> AsyncGenerator[ChoiceChunk, None]:
        """Admits the request (all its choices or none) and streams its choices' chunks; each
        choice ends with a chunk carrying its `Completion`. Raises a `PdserveError` when it
        fails. Close the generator (`aclose`) to cancel: every choice's work on the replicas is
        aborted before `aclose` returns."""
        self._admit(request.num_choices)
        try:
            async for chunk in stream_choices(self._flow, request, deadline, request_id):
                yield chunk
        finally:
            self.num_inflight -= request.num_choices
            if not self.num_inflight:
                self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Refuses new requests and waits up to `grace_s` for in-flight ones to finish.
        Returns whether they all did."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            return False
        return True

    def _admit(self, num_sequences: int) -> None:
        if self._draining:
            raise Unavailable("the server is shutting down")
        limit = self._config.router.max_inflight_requests
        if self.num_inflight + num_sequences > limit:
            raise ResourceExhausted(f"router at capacity ({self.num_inflight} requests in flight)")
        self.num_inflight += num_sequences
        self._idle.clear()
