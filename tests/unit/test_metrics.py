"""Router and replica metrics record what they are told, under the documented names and
bounded labels; the endpoint serves them over HTTP; the Grafana dashboard asks only for
metrics the code defines."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kvtransfer.shm_staging import MIB, ShmStaging, ShmStats
from pdserve.config import MetricsConfig
from pdserve.errors import FailedPrecondition
from pdserve.messages import LoadReport
from pdserve.metrics import ReplicaMetrics, RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
ALLOWED_LABELS = {"status", "stage", "transport", "replica", "role", "state", "api"}
REPLICA = {"replica": "decode-3", "role": "decode"}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def families(registry: CollectorRegistry) -> dict[str, str]:
    """{metric family name: type} of everything the registry exports."""
    return {family.name: family.type for family in registry.collect()}


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape can show, whether or not a labelled child exists yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    return {
        name + suffix
        for name, kind in families(registry).items()
        for suffix in suffixes[kind]
    }


def load_report(**overrides: int) -> LoadReport:
    fields = dict(
        replica_id="decode-3", role="decode", pid=1, node_id="n", num_active_requests=5,
        num_waiting_requests=2, num_free_blocks=30, num_total_blocks=100, num_transfers=1,
    )
    fields.update(overrides)
    return LoadReport(**fields)  # type: ignore[arg-type]


def test_stream_timer_records_ttft_then_gaps_and_tokens() -> None:
    metrics = RouterMetrics()
    registry = metrics.registry
    timer = metrics.stream_timer(admitted_at=0.0)  # monotonic zero: TTFT is "now", large
    timer.tokens_sent(1)
    assert value(registry, "pdserve_router_time_to_first_token_seconds_count") == 1
    assert value(registry, "pdserve_router_time_to_first_token_seconds_sum") > 0
    assert value(registry, "pdserve_router_inter_token_latency_seconds_count") == 0
    timer.tokens_sent(2)
    timer.tokens_sent(1)
    assert value(registry, "pdserve_router_time_to_first_token_seconds_count") == 1
    assert value(registry, "pdserve_router_inter_token_latency_seconds_count") == 2
    assert value(registry, "pdserve_router_streamed_tokens_total") == 4


def test_completion_records_stages_and_tpot() -> None:
    metrics = RouterMetrics()
    registry = metrics.registry
    timings = {
        "queue_s": 0.25, "prefill_s": 0.5, "kv_transfer_s": 0.125, "decode_s": 2.0,
        "time_to_first_token_s": 0.9, "total_s": 3.0,
    }
    metrics.observe_completion(timings, num_attempt_tokens=5)
    for stage, seconds in (("queue", 0.25), ("prefill", 0.5), ("kv_transfer", 0.125),
                           ("decode", 2.0)):
        assert value(registry, "pdserve_router_stage_seconds_count", stage=stage) == 1
        assert value(registry, "pdserve_router_stage_seconds_sum", stage=stage) == seconds
    assert value(registry, "pdserve_router_time_per_output_token_seconds_sum") == 0.5  # 2.0/4
    # One token (no decode step) or no decode timing (a stop string cut the stream): no TPOT.
    metrics.observe_completion(timings, num_attempt_tokens=1)
    metrics.observe_completion({"queue_s": 0.1, "prefill_s": 0.1}, num_attempt_tokens=7)
    assert value(registry, "pdserve_router_time_per_output_token_seconds_count") == 1
    assert value(registry, "pdserve_router_stage_seconds_count", stage="queue") == 3
    assert value(registry, "pdserve_router_stage_seconds_count", stage="decode") == 2


def test_router_counters_and_kv_transfers_by_label() -> None:
    metrics = RouterMetrics()
    registry = metrics.registry
    for status in ("OK", "OK", "DATA_LOSS"):
        metrics.count_request(status)
    metrics.count_retry()
    metrics.count_migration()
    metrics.count_migration()
    metrics.observe_kv_transfer("grpc", 1000, 0.5)
    metrics.observe_kv_transfer("grpc", 24, 0.25)
    metrics.observe_kv_transfer("shm", 7, 0.125)
    metrics.count_kv_transfer_failure("grpc", "DEADLINE_EXCEEDED")
    assert value(registry, "pdserve_router_requests_total", status="OK") == 2
    assert value(registry, "pdserve_router_requests_total", status="DATA_LOSS") == 1
    assert value(registry, "pdserve_router_retries_total") == 1
    assert value(registry, "pdserve_router_migrations_total") == 2
    assert value(registry, "pdserve_router_kv_transfer_bytes_total", transport="grpc") == 1024
    assert value(registry, "pdserve_router_kv_transfer_bytes_total", transport="shm") == 7
    assert value(registry, "pdserve_router_kv_transfer_seconds_count", transport="grpc") == 2
    assert value(registry, "pdserve_router_kv_transfer_seconds_sum", transport="grpc") == 0.75
    assert value(
        registry, "pdserve_router_kv_transfer_failures_total",
        transport="grpc", status="DEADLINE_EXCEEDED",
    ) == 1


def test_inflight_gauge_reads_the_servicer_count_at_scrape() -> None:
    metrics = RouterMetrics()
    inflight = [3]
    metrics.watch_inflight(lambda: inflight[0])
    assert value(metrics.registry, "pdserve_router_requests_in_flight") == 3
    inflight[0] = 0
    assert value(metrics.registry, "pdserve_router_requests_in_flight") == 0


def test_replica_gauges_follow_the_load_report() -> None:
    metrics = ReplicaMetrics("decode-3", "decode")
    registry = metrics.registry
    metrics.observe_load(load_report())
    assert value(registry, "pdserve_replica_active_requests", **REPLICA) == 5
    assert value(registry, "pdserve_replica_waiting_requests", **REPLICA) == 2
    assert value(registry, "pdserve_replica_running_sequences", **REPLICA) == 3
    assert value(registry, "pdserve_replica_kv_blocks_used", **REPLICA) == 70
    assert value(registry, "pdserve_replica_kv_blocks_total", **REPLICA) == 100
    assert value(registry, "pdserve_replica_kv_transfers_in_flight", **REPLICA) == 1
    metrics.observe_load(load_report(num_active_requests=0, num_waiting_requests=0,
                                     num_free_blocks=100, num_transfers=0))
    assert value(registry, "pdserve_replica_kv_blocks_used", **REPLICA) == 0
    assert value(registry, "pdserve_replica_running_sequences", **REPLICA) == 0


def test_replica_passes_steps_and_kv_counters() -> None:
    metrics = ReplicaMetrics("decode-3", "decode")
    registry = metrics.registry
    metrics.observe_decode_step(4, 0.02)
    metrics.observe_decode_step(2, 0.01)
    metrics.observe_prefill_pass(3, 120, 0.5)
    metrics.count_kv_sent("grpc", 4096)
    metrics.count_kv_received("auto", 100)
    metrics.count_kv_received("auto", 28)
    metrics.count_kv_transfer_failure("DATA_LOSS")
    assert value(registry, "pdserve_decode_batch_size_count", **REPLICA) == 2
    assert value(registry, "pdserve_decode_batch_size_sum", **REPLICA) == 6
    assert value(registry, "pdserve_decode_step_duration_seconds_sum", **REPLICA) == 0.03
    assert value(registry, "pdserve_prefill_batch_size_sum", **REPLICA) == 3
    assert value(registry, "pdserve_prefill_batch_tokens_sum", **REPLICA) == 120
    assert value(registry, "pdserve_prefill_pass_duration_seconds_count", **REPLICA) == 1
    assert value(registry, "pdserve_replica_kv_sent_bytes_total", **REPLICA, transport="grpc") \
        == 4096
    assert value(
        registry, "pdserve_replica_kv_received_bytes_total", **REPLICA, transport="auto"
    ) == 128
    assert value(
        registry, "pdserve_replica_kv_transfer_failures_total", **REPLICA, status="DATA_LOSS"
    ) == 1
    # Counted only by prefill replicas with prefix caching; exported at 0 everywhere else.
    assert registry.get_sample_value("pdserve_prefix_cache_hits_total", REPLICA) == 0


def shm_stats(**overrides: int) -> ShmStats:
    fields = dict(
        pool_bytes=0, pool_free_bytes=0, num_active_leases=0, num_quarantined_regions=0,
        num_deferred_reclaims=0, num_pool_transfers=0, num_fallback_transfers=0,
    )
    fields.update(overrides)
    return ShmStats(**fields)


def test_shm_staging_series_read_the_watched_sender_at_each_scrape() -> None:
    metrics = ReplicaMetrics("prefill-1", "prefill")
    registry = metrics.registry
    labels = {"replica": "prefill-1", "role": "prefill"}
    # Before any shm sender exists the series are there, at 0 (no pool).
    assert registry.get_sample_value("pdserve_replica_shm_pool_bytes", labels) == 0
    assert registry.get_sample_value("pdserve_replica_shm_fallback_transfers_total", labels) == 0
    current = [shm_stats(pool_bytes=4096, pool_free_bytes=1024, num_active_leases=2,
                         num_quarantined_regions=1, num_deferred_reclaims=3,
                         num_pool_transfers=5, num_fallback_transfers=1)]
    metrics.watch_shm_staging(lambda: current[0])
    expected = {
        "pdserve_replica_shm_pool_bytes": 4096,
        "pdserve_replica_shm_pool_free_bytes": 1024,
        "pdserve_replica_shm_pool_active_leases": 2,
        "pdserve_replica_shm_pool_quarantined_regions": 1,
        "pdserve_replica_shm_pool_deferred_reclaims_total": 3,
        "pdserve_replica_shm_pool_transfers_total": 5,
        "pdserve_replica_shm_fallback_transfers_total": 1,
    }
    for name, number in expected.items():
        assert registry.get_sample_value(name, labels) == number, name
    current[0] = shm_stats(pool_bytes=4096, pool_free_bytes=4096, num_fallback_transfers=7)
    assert value(registry, "pdserve_replica_shm_pool_free_bytes", **labels) == 4096
    assert value(registry, "pdserve_replica_shm_fallback_transfers_total", **labels) == 7
    assert value(registry, "pdserve_replica_shm_pool_active_leases", **labels) == 0


def test_a_real_fallback_from_the_shm_pool_is_counted() -> None:
    staging = ShmStaging(pool_mb=1)
    metrics = ReplicaMetrics("prefill-0", "prefill")
    metrics.watch_shm_staging(staging.stats)
    labels = {"replica": "prefill-0", "role": "prefill"}
    try:
        with staging.writer("fits", MIB // 4):
            leased = value(metrics.registry, "pdserve_replica_shm_pool_active_leases", **labels)
        with staging.writer("toobig", 2 * MIB):  # larger than the pool: a fresh segment
            pass
        registry = metrics.registry
        assert leased == 1
        assert value(registry, "pdserve_replica_shm_pool_bytes", **labels) >= MIB
        assert value(registry, "pdserve_replica_shm_pool_free_bytes", **labels) == value(
            registry, "pdserve_replica_shm_pool_bytes", **labels
        )
        assert value(registry, "pdserve_replica_shm_pool_transfers_total", **labels) == 1
        assert value(registry, "pdserve_replica_shm_fallback_transfers_total", **labels) == 1
    finally:
        staging.close()


def test_each_object_has_its_own_registry() -> None:
    """Several routers and replicas in one process (tests) must not collide or share counts."""
    first, second = RouterMetrics(), RouterMetrics()
    first.count_request("OK")
    assert value(second.registry, "pdserve_router_requests_total", status="OK") == 0
    replicas = [ReplicaMetrics("a", "prefill") for _ in range(2)]  # no duplicate-series error
    replicas[0].count_kv_sent("grpc", 5)
    assert value(replicas[1].registry, "pdserve_replica_kv_sent_bytes_total",
                 replica="a", role="prefill", transport="grpc") == 0


def _exercise_router() -> RouterMetrics:
    metrics = RouterMetrics()
    metrics.watch_inflight(lambda: 1)
    metrics.watch_pool("decode", ("ready",), lambda: {"ready": 1}, lambda: 1)
    metrics.stream_timer(0.0).tokens_sent(1)
    metrics.observe_completion({"queue_s": 1.0, "decode_s": 1.0}, 3)
    metrics.count_request("OK")
    metrics.count_client_stall("grpc")
    metrics.count_retry()
    metrics.count_migration()
    metrics.observe_kv_transfer("grpc", 1, 0.1)
    metrics.count_kv_transfer_failure("grpc", "DATA_LOSS")
    return metrics


def _exercise_replica() -> ReplicaMetrics:
    metrics = ReplicaMetrics("p", "prefill")
    metrics.observe_load(load_report())
    metrics.observe_prefill_pass(1, 16, 0.1)
    metrics.observe_decode_step(1, 0.1)
    metrics.count_kv_sent("grpc", 1)
    metrics.count_kv_received("grpc", 1)
    metrics.count_kv_transfer_failure("CANCELLED")
    metrics.watch_shm_staging(lambda: shm_stats(pool_bytes=MIB, num_fallback_transfers=1))
    return metrics


@pytest.mark.parametrize("exercise", [_exercise_router, _exercise_replica])
def test_names_units_and_labels(exercise) -> None:  # type: ignore[no-untyped-def]
    registry = exercise().registry
    for family in registry.collect():
        assert family.name.startswith("pdserve_"), family.name
        if family.type == "histogram" and "batch" not in family.name:
            assert family.name.endswith("_seconds"), family.name
        assert family.documentation, family.name
        assert family.samples, f"{family.name}: the exercise recorded nothing"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= ALLOWED_LABELS, sample


def test_endpoint_serves_scrapes_and_stops() -> None:
    metrics = RouterMetrics()
    metrics.count_request("OK")
    address = metrics.serve("127.0.0.1", 0, "metrics.router_port")
    try:
        assert address == metrics.address and address.startswith("127.0.0.1:")
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'pdserve_router_requests_total{status="OK"} 1.0' in text
    finally:
        metrics.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)
    metrics.stop()  # idempotent


def test_taken_port_names_the_config_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FailedPrecondition, match="metrics.replica_port"):
            ReplicaMetrics.start(
                MetricsConfig(replica_port=port), "decode-0", "decode", "10.0.0.1"
            )


def test_replica_start_serves_only_when_enabled() -> None:
    disabled = ReplicaMetrics.start(MetricsConfig(enabled=False), "p", "prefill", "10.0.0.1")
    assert disabled.address == ""
    served = ReplicaMetrics.start(
        MetricsConfig(host="0.0.0.0", replica_port=0), "p", "prefill", "10.0.0.1"
    )
    try:
        # A wildcard bind is advertised under the node's address.
        host, port = served.address.rsplit(":", 1)
        assert host == "10.0.0.1" and int(port) > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"pdserve_prefix_cache_hits_total" in response.read()
    finally:
        served.stop()


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_asks_only_for_defined_metrics() -> None:
    defined = sample_names(RouterMetrics().registry) | sample_names(
        ReplicaMetrics("p", "prefill").registry
    )
    exprs = _dashboard_exprs()
    assert exprs
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\bpdserve_[a-z0-9_]+", expr))
        assert names, f"no pdserve metric in {expr!r}"
        assert names <= defined, f"{expr!r} asks for undefined {sorted(names - defined)}"
        used |= names
    # The panels the dashboard promises.
    for name in (
        "pdserve_router_time_to_first_token_seconds_bucket",
        "pdserve_router_inter_token_latency_seconds_bucket",
        "pdserve_router_time_per_output_token_seconds_bucket",
        "pdserve_router_requests_total",
        "pdserve_router_requests_in_flight",
        "pdserve_replica_kv_blocks_used",
        "pdserve_router_kv_transfer_bytes_total",
        "pdserve_router_kv_transfer_seconds_bucket",
        "pdserve_decode_batch_size_bucket",
    ):
        assert name in used, name


def test_dashboard_queries_group_by_bounded_labels_only() -> None:
    for expr in _dashboard_exprs():
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels <= ALLOWED_LABELS | {"le"}, (expr, labels)
