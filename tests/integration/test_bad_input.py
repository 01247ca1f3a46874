"""Bad requests get INVALID_ARGUMENT naming the field, and the service keeps serving."""

from __future__ import annotations

import grpc
import pytest

from pdserve.client import GenerationClient, collect, make_request
from pdserve.serve import Service
from pdserve.v1 import pdserve_pb2
from tests.integration.conftest import assert_quiet


def _sampling(**fields: object) -> pdserve_pb2.SamplingParams:
    return pdserve_pb2.SamplingParams(**{"max_tokens": 4, **fields})


CASES = [
    ("empty text", pdserve_pb2.GenerateRequest(text="", sampling=_sampling()), "prompt"),
    ("no prompt", pdserve_pb2.GenerateRequest(sampling=_sampling()), "prompt"),
    (
        "empty ids",
        pdserve_pb2.GenerateRequest(token_ids=pdserve_pb2.TokenIds(ids=[]), sampling=_sampling()),
        "prompt",
    ),
    (
        "longer than context",
        pdserve_pb2.GenerateRequest(
            token_ids=pdserve_pb2.TokenIds(ids=[7] * 600), sampling=_sampling()
        ),
        "prompt",
    ),
    ("max_tokens negative", make_request([1, 2], max_tokens=-3), "sampling.max_tokens"),
    ("max_tokens above limit", make_request([1, 2], max_tokens=129), "sampling.max_tokens"),
    ("negative temperature", make_request([1, 2], max_tokens=4, temperature=-0.5),
     "sampling.temperature"),
    ("top_p above 1", make_request([1, 2], max_tokens=4, top_p=1.5), "sampling.top_p"),
    ("top_p negative", make_request([1, 2], max_tokens=4, top_p=-0.1), "sampling.top_p"),
    ("top_k negative", make_request([1, 2], max_tokens=4, top_k=-1), "sampling.top_k"),
    ("unknown token id", make_request([1, 10**6], max_tokens=4), "prompt.token_ids"),
    ("negative token id", make_request([1, -5], max_tokens=4), "prompt.token_ids"),
    ("unknown stop token id", make_request([1, 2], max_tokens=4, stop_token_ids=[10**6]),
     "sampling.stop_token_ids"),
    ("empty stop string", make_request([1, 2], max_tokens=4, stop=[""]), "sampling.stop"),
]


@pytest.mark.parametrize("name,request_message,field", CASES, ids=[c[0] for c in CASES])
def test_invalid_field_is_named(
    tiny_service: Service, name: str, request_message: pdserve_pb2.GenerateRequest, field: str
) -> None:
    with GenerationClient(tiny_service.address) as client, pytest.raises(grpc.RpcError) as caught:
        collect(client._stub.Generate(request_message, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field), caught.value.details()


def test_invalid_utf8_text_is_invalid_argument_not_internal(tiny_service: Service) -> None:
    sampling = _sampling().SerializeToString()
    # GenerateRequest: field 1 (text) = b"\xff\xfe" (not UTF-8), field 3 (sampling).
    raw = b"\x0a\x02\xff\xfe" + b"\x1a" + bytes([len(sampling)]) + sampling
    with grpc.insecure_channel(tiny_service.address) as channel:
        call = channel.unary_stream(
            "/pdserve.v1.Generation/Generate",
            request_serializer=None,
            response_deserializer=pdserve_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call(raw, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("prompt.text")


def test_service_keeps_serving_after_bad_input(tiny_service: Service) -> None:
    with GenerationClient(tiny_service.address, timeout_s=60) as client:
        for _, request_message, _ in CASES:
            with pytest.raises(grpc.RpcError):
                collect(client._stub.Generate(request_message, timeout=30))
        result = collect(client.generate([5, 6, 7], max_tokens=5, ignore_eos=True))
    assert len(result.token_ids) == 5
    assert result.final.finish_reason == pdserve_pb2.FINISH_REASON_LENGTH
    assert_quiet(tiny_service)
