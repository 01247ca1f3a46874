"""What the router measures: latency as the client sees it, outcomes, KV hand-offs, the
router queue, preemptions and pool sizes.

Created by `router.server.Router`, handed to the request flow, its attempts and the servicer.
Labels are bounded: gRPC status names, API names, stage names, KV transport names, pool roles
and replica states, never request ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from prometheus_client import Counter, Gauge, Histogram

from pdserve.metrics.buckets import REQUEST_SECONDS, TOKEN_SECONDS
from pdserve.metrics.endpoint import MetricsEndpoint
from pdserve.metrics.stream_timer import StreamTimer

# Final-timing keys (see `pdserve.v1.Timings`) and the `stage` label each is recorded under.
STAGES = {
    "queue_s": "queue",
    "prefill_s": "prefill",
    "kv_transfer_s": "kv_transfer",
    "decode_s": "decode",
}


class RouterMetrics(MetricsEndpoint):
    """The router's metrics. Recording methods never block and are thread-safe; the router's
    event loop calls them."""

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self.time_to_first_token = Histogram(
            "pdserve_router_time_to_first_token_seconds",
            "From admission by the router until the first token was sent to the client.",
            registry=registry, buckets=REQUEST_SECONDS,
        )
        self.stage = Histogram(
            "pdserve_router_stage_seconds",
            "Parts of finished requests, from their final timings: queue, prefill, kv_transfer "
            "(hand-off time after the prefill pass) and decode.",
            ["stage"], registry=registry, buckets=REQUEST_SECONDS,
        )
        self.inter_token_latency = Histogram(
            "pdserve_router_inter_token_latency_seconds",
            "Gaps between consecutive token messages the router streams to a client.",
            registry=registry, buckets=TOKEN_SECONDS,
        )
        self.time_per_output_token = Histogram(
            "pdserve_router_time_per_output_token_seconds",
            "Per finished request: decode time / (tokens its decode replica served - 1).",
            registry=registry, buckets=TOKEN_SECONDS,
        )
        self.streamed_tokens = Counter(
            "pdserve_router_streamed_tokens_total", "Tokens streamed to clients.",
            registry=registry,
        )
        self.requests = Counter(
            "pdserve_router_requests_total",
            "Generation requests (gRPC and HTTP) by how they ended: OK (finished), or the "
            "status code name (a client's deadline that passed is DEADLINE_EXCEEDED; a stream "
            "the router ended early, by a drain cut or a stalled client, is CANCELLED).",
            ["status"], registry=registry,
        )
        self.client_stalls = Counter(
            "pdserve_router_client_stalls_total",
            "Streams cancelled because their client accepted no data for "
            "timeouts.client_stall_s, by API (grpc, http).",
            ["api"], registry=registry,
        )
        self.requests_in_flight = Gauge(
            "pdserve_router_requests_in_flight", "Generate calls admitted and not yet ended.",
            registry=registry,
        )
        self.retries = Counter(
            "pdserve_router_retries_total",
            "Requests started over on other replicas before any token was sent.",
            registry=registry,
        )
        self.preemptions = Counter(
            "pdserve_router_preemptions_total",
            "Times a replica preempted a request (freed its KV to let older sequences grow) "
            "and the router re-prefilled it (or failed it past reliability.max_preemptions).",
            registry=registry,
        )
        self.requests_queued = Gauge(
            "pdserve_router_queued_requests",
            "Requests waiting in the router queue for an in-flight slot or decode room.",
            registry=registry,
        )
        self.migrations = Counter(
            "pdserve_router_migrations_total",
            "Requests moved to another replica pair after tokens were sent.",
            registry=registry,
        )
        self.kv_transfer_bytes = Counter(
            "pdserve_router_kv_transfer_bytes_total",
            "KV bytes of completed hand-offs, by the transport that carried them.",
            ["transport"], registry=registry,
        )
        self.kv_transfer_seconds = Histogram(
            "pdserve_router_kv_transfer_seconds",
            "Completed hand-offs: time after the prefill pass until the decode side had the KV.",
            ["transport"], registry=registry, buckets=REQUEST_SECONDS,
        )
        self.kv_transfer_failures = Counter(
            "pdserve_router_kv_transfer_failures_total",
            "Hand-offs that ended in an error, by the transport asked for and the status.",
            ["transport", "status"], registry=registry,
        )
        self.pool_replicas = Gauge(
            "pdserve_router_pool_replicas",
            "Replicas of each pool (role) by state: starting, ready, draining, unresponsive, "
            "dead.",
            ["role", "state"], registry=registry,
        )
        self.pool_target_replicas = Gauge(
            "pdserve_router_pool_target_replicas",
            "Size each pool is moving to: as configured, or as set by `pdserve scale` or the "
            "autoscaler.",
            ["role"], registry=registry,
        )

    def watch_inflight(self, count: Callable[[], int]) -> None:
        """Reads the in-flight gauge from `count` at each scrape (scrape thread; must not
        block)."""
        self.requests_in_flight.set_function(count)

    def watch_queue(self, count: Callable[[], int]) -> None:
        """Reads the router queue's depth from `count` at each scrape (scrape thread; must not
        block)."""
        self.requests_queued.set_function(count)

    def watch_pool(
        self,
        role: str,
        states: Sequence[str],
        counts: Callable[[], Mapping[str, int]],
        target: Callable[[], int],
    ) -> None:
        """Reads the `role` pool's replicas per state and its target at each scrape (scrape
        thread: `counts` and `target` must not block and must tolerate the router changing
        the pool)."""
        for state in states:
            self.pool_replicas.labels(role, state).set_function(
                lambda state=state: counts().get(state, 0)  # type: ignore[misc]
            )
        self.pool_target_replicas.labels(role).set_function(target)

    def stream_timer(self, admitted_at: float) -> StreamTimer:
        """A timer for one request's stream; `admitted_at` is `time.monotonic()`."""
        return StreamTimer(self, admitted_at)

    def count_request(self, status: str) -> None:
        self.requests.labels(status).inc()

    def count_client_stall(self, api: str) -> None:
        self.client_stalls.labels(api).inc()

    def count_retry(self) -> None:
        self.retries.inc()

    def count_migration(self) -> None:
        self.migrations.inc()

    def count_preemption(self) -> None:
        self.preemptions.inc()

    def observe_completion(self, timings: dict[str, float], num_attempt_tokens: int) -> None:
        """A request finished. `timings` are its final timings; `num_attempt_tokens` the
        tokens its last attempt produced (the first from prefill, the rest from decode)."""
        for key, stage in STAGES.items():
            if key in timings:
                self.stage.labels(stage).observe(timings[key])
        if "decode_s" in timings and num_attempt_tokens > 1:
            self.time_per_output_token.observe(timings["decode_s"] / (num_attempt_tokens - 1))

    def observe_kv_transfer(self, transport: str, num_bytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.labels(transport).inc(num_bytes)
        self.kv_transfer_seconds.labels(transport).observe(seconds)

    def count_kv_transfer_failure(self, transport: str, status: str) -> None:
        self.kv_transfer_failures.labels(transport, status).inc()
