"""A client that stops reading gives up its KV first when the cache runs out, in both modes.

One request's client (a raw HTTP/2 call granting a 64-byte window) stops reading at once; the
router marks its sequence a stalled reader on its replica after `timeouts.reader_slow_s`. Then
5 requests from clients that read start beside it: together they outgrow the small cache. The
stalled request is admitted first, so by age it would be the one sequence never preempted; as
a stalled reader it is the first victim, so none of the reading clients is preempted, each gets
`transformers`' greedy output, and the replicas counted the preemption. Once the stalled client
hangs up, nothing is left behind. Decode steps with the stalled request in the batch are slowed
(fault injection) so that it is still running when the cache fills."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pdserve.client import GenerationClient, GenerationResult, collect, make_request
from pdserve.config import PdserveConfig
from pdserve.serve import Service
from tests.factories.config import make_config
from tests.factories.stalled_clients import StalledGrpcCall
from tests.integration.colocated_oracle import assert_colocated_quiet
from tests.integration.conftest import assert_quiet, load_reports, wait_for
from tests.integration.test_replica_failures import reference

TARGET = 333
# 200 prompt tokens + up to 256 new ones: 13 blocks of 16 at the start, 29 at the end.
STALLED_PROMPT = [TARGET, *(7 + i % 300 for i in range(199))]
STALLED_MAX_TOKENS = 256
# 4-12 prompt tokens + 200 new ones: 14 blocks each at the end, 70 together; with the stalled
# request's 25 or more by then, more than the 85 blocks of 1 MiB of tiny-model KV.
PROMPTS = [[3 + i, *range(10 + 7 * i, 13 + 9 * i)] for i in range(5)]
MAX_TOKENS = 200
GENERATE = "/pdserve.v1.Generation/Generate"


def _config(model_dir: Path, mode: str) -> PdserveConfig:
    cache = {"memory_mb": 1, "block_size": 16}
    pools = (
        {"colocated": {"replicas": 1, "kv_cache": cache}} if mode == "colocated"
        else {"decode": {"kv_cache": cache}}
    )
    return make_config(
        str(model_dir), mode=mode, limits={"max_tokens": 256},
        reliability={"max_preemptions": 50},
        # Long enough that the stalled request is not cancelled during the test.
        timeouts={"client_stall_s": 120.0, "reader_slow_s": 0.3},
        faults={"target_token_id": TARGET, "decode_step_delay_s": 0.04},
        **pools,
    )


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def service(
    request: pytest.FixtureRequest, ray_cluster: None, tiny_model_dir: Path
) -> Iterator[Service]:
    with Service(_config(tiny_model_dir, request.param)) as running:
        yield running


def generate(address: str, prompt: list[int]) -> GenerationResult:
    with GenerationClient(address, timeout_s=300) as client:
        return collect(client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True))


def num_stalled_readers(service: Service) -> int:
    return sum(report.num_stalled_readers for report in load_reports(service))


def replica_preemptions(service: Service) -> int:
    return sum(report.total_preemptions for report in load_reports(service))


def test_the_stalled_reader_is_preempted_instead_of_the_clients_that_read(
    service: Service, tiny_model_dir: Path
) -> None:
    expected = [reference(tiny_model_dir, prompt, MAX_TOKENS) for prompt in PROMPTS]
    preemptions_before = replica_preemptions(service)
    stalled = make_request(STALLED_PROMPT, max_tokens=STALLED_MAX_TOKENS, ignore_eos=True)
    port = int(service.address.rsplit(":", 1)[1])
    with StalledGrpcCall(port, GENERATE, stalled.SerializeToString(), window=64) as call:
        wait_for(lambda: num_stalled_readers(service) == 1, "the stalled reader's mark")
        with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: generate(service.address, p), PROMPTS))
        assert call.num_bytes_received <= 64
        assert [result.token_ids for result in results] == expected
        per_request = [r.final.served_by.num_preemptions for r in results if r.final]
        assert per_request == [0] * len(PROMPTS), "no client that reads was preempted"
        assert replica_preemptions(service) - preemptions_before >= 1
    if service.config.mode == "colocated":
        assert_colocated_quiet(service)
    else:
        assert_quiet(service)
