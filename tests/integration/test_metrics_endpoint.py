"""Prometheus endpoints of a running service: after a few requests (one of them with a KV
transfer corrupted on the wire) the router's and each replica's `/metrics`, scraped over HTTP,
moved by exactly what the requests did. The decode replica runs with `resources.pin_cpus`: its
process is confined to one core and says so in `pdserve_replica_pinned_cpus`."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import GenerationClient, collect
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.integration.conftest import assert_quiet

# Prompts starting with TARGET get their KV corrupted on the wire (config `faults`).
TARGET = 333
TARGET_PROMPT = [TARGET, *range(20, 60)]
PROMPTS = [[5, 17, 42, 99, 7, 3], [11, 12], list(range(100, 140))]
MAX_TOKENS = 6


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of one `/metrics` page."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def service(ray_cluster: None, tiny_model_dir: Path) -> Iterator[Service]:
    config = make_config(
        str(tiny_model_dir),
        metrics={"router_port": 0},
        kv_transfer={"transport": "grpc", "chunk_bytes": 16384},
        decode={"resources": {"num_cpus": 1, "pin_cpus": True}},
        faults={"target_token_id": TARGET, "kv_chunk_fault": "corrupt", "kv_chunk_fault_seq": 1},
    )
    with Service(config) as running:
        yield running


def test_router_and_replica_metrics_count_what_happened(service: Service) -> None:
    results, num_messages = [], 0
    with GenerationClient(service.address, timeout_s=60) as client:
        for prompt in PROMPTS:
            responses = list(client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True))
            num_messages += sum(1 for r in responses if r.token_ids)
            results.append(collect(responses))
        with pytest.raises(grpc.RpcError) as failed:
            collect(client.generate(TARGET_PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert failed.value.code() == grpc.StatusCode.DATA_LOSS
    reports = assert_quiet(service)  # also refreshes the replicas' load gauges
    num_ok = len(PROMPTS)
    kv_bytes = sum(r.final.served_by.kv_bytes for r in results)
    num_tokens = sum(r.num_tokens for r in results)
    assert kv_bytes > 0 and num_tokens == num_ok * MAX_TOKENS

    assert service.router is not None
    router = scrape(service.router.metrics.address)
    assert get(router, "pdserve_router_requests_total", status="OK") == num_ok
    assert get(router, "pdserve_router_requests_total", status="DATA_LOSS") == 1
    assert get(router, "pdserve_router_requests_in_flight") == 0
    # The failed request got its first token (from prefill) before its hand-off broke.
    assert get(router, "pdserve_router_time_to_first_token_seconds_count") == num_ok + 1
    assert get(router, "pdserve_router_streamed_tokens_total") == num_tokens + 1
    assert get(router, "pdserve_router_inter_token_latency_seconds_count") == num_messages - num_ok
    assert get(router, "pdserve_router_time_per_output_token_seconds_count") == num_ok
    for stage in ("queue", "prefill", "kv_transfer", "decode"):
        assert get(router, "pdserve_router_stage_seconds_count", stage=stage) == num_ok
    assert get(router, "pdserve_router_kv_transfer_bytes_total", transport="grpc") == kv_bytes
    assert get(router, "pdserve_router_kv_transfer_seconds_count", transport="grpc") == num_ok
    assert get(
        router, "pdserve_router_kv_transfer_failures_total", transport="grpc", status="DATA_LOSS"
    ) == 1
    assert get(router, "pdserve_router_retries_total") == 0

    by_role = {report.role: report for report in reports}
    prefill = scrape(by_role["prefill"].metrics_address)
    labels = {"replica": by_role["prefill"].replica_id, "role": "prefill"}
    assert get(prefill, "pdserve_replica_kv_sent_bytes_total", **labels, transport="grpc") \
        == kv_bytes == by_role["prefill"].total_kv_bytes
    # Every prompt, the failed one included, ran in exactly one prefill pass.
    num_prompt_tokens = sum(len(p) for p in [*PROMPTS, TARGET_PROMPT])
    assert get(prefill, "pdserve_prefill_batch_size_sum", **labels) == num_ok + 1
    assert get(prefill, "pdserve_prefill_batch_tokens_sum", **labels) == num_prompt_tokens
    # The sender's status depends on where it noticed the damage; there was one failure.
    failures = "pdserve_replica_kv_transfer_failures_total"
    assert sum(v for (name, _), v in prefill.items() if name == failures) == 1
    assert get(prefill, "pdserve_replica_kv_blocks_total", **labels) \
        == by_role["prefill"].num_total_blocks > 0
    assert get(prefill, "pdserve_replica_kv_blocks_used", **labels) == 0

    decode_report = by_role["decode"]
    decode = scrape(decode_report.metrics_address)
    labels = {"replica": decode_report.replica_id, "role": "decode"}
    assert get(decode, "pdserve_replica_kv_received_bytes_total", **labels, transport="grpc") \
        == kv_bytes
    assert get(
        decode, "pdserve_replica_kv_transfer_failures_total", **labels, status="DATA_LOSS"
    ) == 1
    assert decode_report.total_decode_steps > 0
    assert get(decode, "pdserve_decode_step_duration_seconds_count", **labels) \
        == decode_report.total_decode_steps
    assert get(decode, "pdserve_decode_batch_size_sum", **labels) \
        == decode_report.total_decode_tokens == num_ok * (MAX_TOKENS - 1)
    assert get(decode, "pdserve_replica_running_sequences", **labels) == 0
    assert get(decode, "pdserve_prefix_cache_hits_total", **labels) == 0


def test_a_pinned_replica_runs_on_one_core_and_exports_it(service: Service) -> None:
    by_role = {report.role: report for report in assert_quiet(service)}
    decode_report, prefill_report = by_role["decode"], by_role["prefill"]
    decode = scrape(decode_report.metrics_address)
    labels = {"replica": decode_report.replica_id, "role": "decode"}
    assert get(decode, "pdserve_replica_pinned_cpus", **labels) == 1
    assert len(os.sched_getaffinity(decode_report.pid)) == 1
    prefill = scrape(prefill_report.metrics_address)
    labels = {"replica": prefill_report.replica_id, "role": "prefill"}
    assert get(prefill, "pdserve_replica_pinned_cpus", **labels) == 0
