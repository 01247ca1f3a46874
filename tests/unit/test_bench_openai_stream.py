"""The pieces of the openai-* backends without a server: the SSE reader, folding chunks into
a record, error objects and statuses, the request bodies and the chat prompt decoder."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pdserve.bench.openai_requests import RequestBuilder, load_prompt_decoder
from pdserve.bench.openai_stream import ChunkFolder, error_object, error_status
from pdserve.bench.records import RequestRecord
from pdserve.bench.sse import SseData, sse_data
from pdserve.bench.workload import RequestShape
from pdserve.errors import InvalidArgument
from tests.factories.tokenizer import train_byte_level_tokenizer


async def _lines(*lines: bytes) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


async def test_sse_reader_yields_data_lines_with_their_event() -> None:
    stream = _lines(
        b": keep-alive\n", b"data: {\"a\": 1}\r\n", b"\n", b"event: error\n",
        b"data:{\"error\": {}}\n", b"\n", b"id: 7\n", b"data: [DONE]\n", b"\n",
    )  # fmt: skip
    items = [item async for item in sse_data(stream)]
    assert items == [
        SseData("", '{"a": 1}'), SseData("error", '{"error": {}}'), SseData("", "[DONE]")
    ]  # fmt: skip
    assert [item.done for item in items] == [False, False, True]


def _chat_chunk(content: str | None = None, finish: str | None = None) -> SseData:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return SseData("", json.dumps({"id": "c-1", "choices": [choice]}))


def test_only_content_chunks_are_arrivals_and_usage_sets_the_count() -> None:
    record = RequestRecord(index=0, kind="main", max_tokens=8, scheduled_s=0.0)
    folder = ChunkFolder(record, chat=True)
    usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 8}}
    items = [
        (_chat_chunk(""), 0.1),  # the role chunk
        (_chat_chunk("ab"), 0.2),
        (_chat_chunk("cde"), 0.5),
        (_chat_chunk(None, finish="length"), 0.6),
        (SseData("", json.dumps(usage)), 0.6),
    ]
    assert not any(folder.add(item, offset) for item, offset in items)
    assert folder.add(SseData("", "[DONE]"), 0.7)
    folder.close()
    assert record.ok and record.finish_reason == "length" and record.request_id == "c-1"
    assert record.message_offsets_s == [0.2, 0.5] and record.message_num_tokens == [1, 1]
    assert (record.num_completion_tokens, record.num_prompt_tokens) == (8, 11)
    assert record.ttft_s == 0.2 and record.itl_gaps_s() == pytest.approx([0.3])
    assert record.tpot_s == pytest.approx(0.3 / 7)  # over the usage's 8 tokens


def test_a_stream_without_finish_reason_is_no_final() -> None:
    record = RequestRecord(index=0, kind="main", max_tokens=8, scheduled_s=0.0)
    folder = ChunkFolder(record, chat=False)
    folder.add(SseData("", json.dumps({"choices": [{"text": "x"}]})), 0.1)
    folder.close()
    assert record.status == "NO_FINAL" and record.message_num_tokens == [1]


def test_a_chunk_that_is_not_an_object_is_a_value_error() -> None:
    record = RequestRecord(index=0, kind="main", max_tokens=8, scheduled_s=0.0)
    with pytest.raises(ValueError):
        ChunkFolder(record, chat=False).add(SseData("", "[1, 2]"), 0.1)


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"error": {"message": "m", "code": 503}}, "HTTP_503", "m"),
        ({"error": {"message": "m", "code": "resource_exhausted"}}, "RESOURCE_EXHAUSTED", "m"),
        ({"object": "error", "message": "m", "type": "BadRequestError"}, "BadRequestError", "m"),
        ({"error": "just text"}, "STREAM_ERROR", "just text"),
    ],
)
def test_error_objects_give_status_and_message(payload: dict, status: str, message: str) -> None:
    assert error_status(error_object(payload)) == status
    record = RequestRecord(index=0, kind="main", max_tokens=8, scheduled_s=0.0)
    assert ChunkFolder(record, chat=True).add(SseData("", json.dumps(payload)), 0.1)
    assert (record.status, record.error) == (status, message)


def test_request_bodies() -> None:
    shape = RequestShape("main", (5, 6, 7), 9)
    completions = RequestBuilder("openai-completions", "m", True, None)
    body = json.loads(completions.body(shape))
    assert completions.path == "/completions" and body["prompt"] == [5, 6, 7]
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    chat = RequestBuilder("openai-chat", "m", False, lambda ids: f"{len(ids)} ids")
    body = json.loads(chat.body(shape))
    assert chat.path == "/chat/completions" and "ignore_eos" not in body
    assert body["messages"] == [{"role": "user", "content": "3 ids"}]
    with pytest.raises(InvalidArgument):
        RequestBuilder("openai-chat", "m", True, None).body(shape)


def test_prompt_decoder_loads_a_file_or_folder_and_checks_the_vocabulary(tmp_path: Path) -> None:
    tokenizer = train_byte_level_tokenizer()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ids = tokenizer.encode("Hello world").ids
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert load_prompt_decoder(str(path), vocab_high=300)(ids) == "Hello world"
    with pytest.raises(InvalidArgument) as info:
        load_prompt_decoder(str(tmp_path), vocab_high=10_000)
    assert info.value.field == "--vocab-high"
    with pytest.raises(InvalidArgument) as info:
        load_prompt_decoder(str(tmp_path / "missing.json"), vocab_high=1)
    assert info.value.field == "--tokenizer"
