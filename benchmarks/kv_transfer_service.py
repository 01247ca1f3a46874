"""What the KV hand-off adds to a real pdserve service's first tokens.

For each KV transport asked for, starts a `Service` (1 prefill + 1 decode replica of the
embedded SmolLM2-135M, fp32, one torch thread each) with `kv_transfer.layer_pipelining` on,
then another with it off, and sends the same long prompt several times to each, reading the
server's timings from each final message. The first token streams from the prefill replica, so
the exposed hand-off delays the second token; both client-side times are recorded too.
Imports Ray and the service lazily: the transfer part of the benchmark does not need them.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from pdserve.config import EMBEDDED_MODEL, PdserveConfig, parse_config

# Common token ids of SmolLM2's 49,152-token vocabulary (plain English sub-words).
_PROMPT_ID_START = 1000
_PROMPT_ID_SPAN = 2000
# One Generate call of a 1,024-token prompt takes seconds; allow for a loaded machine.
_CALL_TIMEOUT_S = 300.0
# The router may start before its first load poll saw the replicas ready (slow on a busy box).
_READY_TIMEOUT_S = 120.0
_READY_POLL_S = 0.5


def prompt_token_ids(num_tokens: int) -> list[int]:
    return [_PROMPT_ID_START + i % _PROMPT_ID_SPAN for i in range(num_tokens)]


def service_config(
    transport: str, layer_pipelining: bool, num_prompt_tokens: int
) -> PdserveConfig:
    replica = {"num_cpus": 1, "torch_threads": 1}
    # Room for the prompt, two new tokens and block rounding, on either side.
    kv_cache = {"memory_mb": 128}
    return parse_config({
        "model": {"source": EMBEDDED_MODEL, "dtype": "float32",
                  "max_context_tokens": max(2048, 2 * num_prompt_tokens)},
        "ray": {"num_cpus": 4, "namespace": "pdserve-bench"},
        # The same prompt is sent again and again: a prefix-cache hit would skip the pass.
        "prefill": {"replicas": 1, "resources": replica, "kv_cache": kv_cache,
                    "prefix_caching": False},
        "decode": {"replicas": 1, "resources": replica, "kv_cache": kv_cache},
        "kv_transfer": {"transport": transport, "layer_pipelining": layer_pipelining},
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0},
        "metrics": {"router_port": 0},
        "limits": {"max_tokens": 16},
        "log_level": "WARNING",
    })


def measure_service(
    transports: list[str], num_prompt_tokens: int, num_requests: int
) -> dict[str, Any]:
    """Runs two services per transport (`kv_transfer.transport` values, e.g. "grpc", "auto"),
    one after the other in one local Ray instance (started here with 4 logical CPUs unless this
    process already has one). Blocks for minutes; raises whatever a service or call raises."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
                 namespace="pdserve-bench")
    try:
        runs = {
            transport: {
                f"pipelining_{'on' if on else 'off'}":
                    _measure_or_fail(transport, on, num_prompt_tokens, num_requests)
                for on in (True, False)
            }
            for transport in transports
        }
        return {"num_prompt_tokens": num_prompt_tokens, "num_requests": num_requests,
                "runs": runs}
    finally:
        if started_ray:
            ray.shutdown()


def _measure_or_fail(
    transport: str, layer_pipelining: bool, num_prompt_tokens: int, num_requests: int
) -> dict[str, Any]:
    """One run's figures, or {"error": ...}: one failed service must not lose the others."""
    try:
        return _measure_one(transport, layer_pipelining, num_prompt_tokens, num_requests)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _measure_one(
    transport: str, layer_pipelining: bool, num_prompt_tokens: int, num_requests: int
) -> dict[str, Any]:
    from pdserve.client import GenerationClient, collect
    from pdserve.serve import Service

    prompt = prompt_token_ids(num_prompt_tokens)
    config = service_config(transport, layer_pipelining, num_prompt_tokens)
    rows = []
    with Service(config) as service, GenerationClient(service.address, _CALL_TIMEOUT_S) as client:
        _wait_until_ready(client)
        # The first pass of a fresh replica is slower (allocations, kernel selection).
        for attempt in range(num_requests + 1):
            result = collect(client.generate(prompt, max_tokens=2, ignore_eos=True))
            if result.final is None:
                raise RuntimeError("a Generate stream ended without its final message")
            if attempt > 0:
                rows.append(_row(result.final, result.ttft_s, result.decode_s))
    return _summary(rows)


def _wait_until_ready(client: Any) -> None:
    """Polls Info until both pools have a READY replica; raises TimeoutError after a bound."""
    from pdserve.v1 import pdserve_pb2

    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        info = client.info()
        pools = (info.prefill, info.decode)
        if all(any(r.state == pdserve_pb2.REPLICA_STATE_READY for r in p.replicas) for p in pools):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not ready after {_READY_TIMEOUT_S} s: {info}")
        time.sleep(_READY_POLL_S)  # polling interval of a bounded wait


def _row(final: Any, client_ttft_s: float, client_second_token_gap_s: float) -> dict[str, Any]:
    timings, served_by = final.timings, final.served_by
    return {
        "queue_s": timings.queue_s,
        "prefill_s": timings.prefill_s,
        "kv_transfer_s": timings.kv_transfer_s,
        "time_to_first_token_s": timings.time_to_first_token_s,
        "client_ttft_s": client_ttft_s,
        # First to last token-carrying message: with max_tokens=2, the wait for the second.
        "client_second_token_gap_s": client_second_token_gap_s,
        "kv_bytes": served_by.kv_bytes,
        "kv_transport": served_by.kv_transport,
        "mode": served_by.mode,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    ratios = [row["kv_transfer_s"] / row["prefill_s"] for row in rows if row["prefill_s"] > 0]
    return {
        "requests": rows,
        "median_prefill_s": median("prefill_s"),
        "median_kv_transfer_s": median("kv_transfer_s"),
        "median_time_to_first_token_s": median("time_to_first_token_s"),
        "median_client_ttft_s": median("client_ttft_s"),
        "median_client_second_token_gap_s": median("client_second_token_gap_s"),
        "median_kv_transfer_over_prefill": statistics.median(ratios) if ratios else None,
        "kv_bytes": rows[0]["kv_bytes"] if rows else 0,
        "kv_transport": rows[0]["kv_transport"] if rows else "",
    }
