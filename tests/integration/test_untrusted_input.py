"""Untrusted bytes at every entry point: fuzzed GenerateRequests through the real router only
ever get OK / INVALID_ARGUMENT / RESOURCE_EXHAUSTED, and pickle payloads sent to every internal
endpoint (replica actor methods, the KV port) never execute."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import grpc
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.messages import LoadReport, decode
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from tests.integration.conftest import assert_quiet

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling = st.builds(
    pdserve_pb2.SamplingParams,
    max_tokens=st.integers(-5, 200),
    temperature=floats,
    top_p=floats,
    top_k=st.integers(-3, 1000),
    stop=st.lists(st.text(max_size=80), max_size=10),
    stop_token_ids=st.lists(st.integers(-10, 10**6), max_size=40),
    ignore_eos=st.booleans(),
)
requests = st.one_of(
    st.builds(pdserve_pb2.GenerateRequest, text=st.text(max_size=200), sampling=sampling),
    st.builds(
        pdserve_pb2.GenerateRequest,
        token_ids=st.builds(pdserve_pb2.TokenIds, ids=st.lists(st.integers(-5, 600), max_size=600)),
        sampling=sampling,
    ),
    st.builds(pdserve_pb2.GenerateRequest, sampling=st.one_of(st.none(), sampling)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests)
def test_fuzzed_requests_get_only_expected_statuses(tiny_service: Service, request) -> None:
    with grpc.insecure_channel(tiny_service.address) as channel:
        stub = pdserve_pb2_grpc.GenerationStub(channel)
        capped = pdserve_pb2.GenerateRequest()
        capped.CopyFrom(request)
        if capped.sampling.max_tokens > 8:  # keep each example fast; bounds are tested too
            capped.sampling.max_tokens = 8
        try:
            for _ in stub.Generate(capped, timeout=60):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        assert code in ALLOWED, (capped, code)


class _Canary:
    """Unpickling this creates a file: proof that something unpickled attacker bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_payloads_to_internal_endpoints_never_execute(
    tiny_service: Service, tmp_path: Path
) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Canary(str(control))))  # the canary works when unpickled
    assert control.exists()
    canary = tmp_path / "pwned"
    payload = pickle.dumps(_Canary(str(canary)))
    prefill = tiny_service.prefill_actors["prefill-0"]
    decode_actor = tiny_service.decode_actors["decode-0"]
    for call in (
        lambda: ray.get(decode_actor.reserve.remote(payload), timeout=30),
        lambda: list(ray.get(r, timeout=30) for r in prefill.prefill.options(
            num_returns="streaming").remote(payload)),
        lambda: list(ray.get(r, timeout=30) for r in decode_actor.generate.options(
            num_returns="streaming").remote(payload)),
    ):
        with pytest.raises(ray.exceptions.RayTaskError):
            call()
    kv_address = decode(LoadReport, ray.get(decode_actor.load.remote(), timeout=30)).kv_address
    with grpc.insecure_channel(kv_address) as channel:
        for method in ("Push", "Handshake"):
            rpc = (
                channel.stream_unary(f"/pdserve.internal.v1.KVTransfer/{method}")
                if method == "Push"
                else channel.unary_unary(f"/pdserve.internal.v1.KVTransfer/{method}")
            )
            with pytest.raises(grpc.RpcError):
                rpc(iter([payload]) if method == "Push" else payload, timeout=30)
    assert not canary.exists()
    assert_quiet(tiny_service)
