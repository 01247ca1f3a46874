"""How one streamed OpenAI-compatible response becomes a RequestRecord.

The chunks, as OpenAI sends them: a first chunk with the role (and empty content), content
chunks, a chunk whose choice has a `finish_reason`, then (asked for with
`stream_options.include_usage`) a chunk with empty `choices` and the `usage`, then
`data: [DONE]`. llama.cpp puts the usage in the finish chunk and vLLM with continuous usage
stats in every chunk: the last usage seen counts.

- Token arrivals: a chunk whose choice has non-empty `text` (completions) or `delta.content`
  (chat; a reasoning model's `delta.reasoning_content` / `delta.reasoning` too) is one arrival:
  the first is the first token (TTFT), each later one ends an inter-token gap. A chunk may
  carry several tokens and its count is not on the wire, so gaps are measured between chunk
  arrivals (`message_unit` CHUNKS, as vLLM's benchmark does); the usage's `completion_tokens`
  is the true count, used for TPOT and throughput. Without usage the number of content chunks
  is the count (`num_tokens_source` COUNTED).
- Outcome: OK when a `finish_reason` arrived and the stream ended (`[DONE]`, or the server
  closed it) without an error. An `event: error` line or a chunk holding an `error` object
  fails the request with the error's status (see `error_status`) and message (what follows,
  such as pdserve's `[DONE]`, is not read); a stream that ends without a `finish_reason` is
  NO_FINAL.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.bench.records import CHUNKS, COUNTED, NO_FINAL, OK, USAGE, RequestRecord
from pdserve.bench.sse import SseData

STREAM_ERROR = "STREAM_ERROR"  # an error event without a usable code or type
MAX_ERROR_CHARS = 500


class ChunkFolder:
    """Folds the data lines of one response into `record`, in arrival order. Not
    thread-safe; one per request."""

    def __init__(self, record: RequestRecord, chat: bool) -> None:
        record.message_unit = CHUNKS
        self._record = record
        self._chat = chat
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None

    def add(self, item: SseData, offset_s: float) -> bool:
        """Takes one data line that arrived `offset_s` after sending; returns True when the
        stream is over ([DONE] or an error, which is recorded). Raises ValueError for data
        that is not a JSON object."""
        if item.done:
            return True
        chunk = json.loads(item.data)
        if not isinstance(chunk, dict):
            raise ValueError(f"chunk is not a JSON object: {item.data[:MAX_ERROR_CHARS]}")
        if item.event == "error" or chunk.get("error") or chunk.get("object") == "error":
            self._record.status = error_status(error_object(chunk))
            self._record.error = error_message(error_object(chunk))
            return True
        if not self._record.request_id and isinstance(chunk.get("id"), str):
            self._record.request_id = chunk["id"]
        choices = chunk.get("choices") or []
        if any(self._content(choice) for choice in choices if isinstance(choice, dict)):
            self._record.add_message(offset_s, 1)
        for choice in choices:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self._finish_reason = str(choice["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        return False

    def close(self) -> None:
        """Sets the outcome once the stream has ended without an error."""
        record = self._record
        if self._finish_reason is None:
            record.status = NO_FINAL
            record.error = "the stream ended without a finish_reason"
            return
        record.status = OK
        record.finish_reason = self._finish_reason
        usage = self._usage or {}
        completion_tokens = usage.get("completion_tokens")
        if isinstance(completion_tokens, int):
            record.num_completion_tokens = completion_tokens
            record.num_tokens_source = USAGE
        else:
            record.num_completion_tokens = record.num_tokens_received
            record.num_tokens_source = COUNTED
        if isinstance(usage.get("prompt_tokens"), int):
            record.num_prompt_tokens = usage["prompt_tokens"]

    def _content(self, choice: dict[str, Any]) -> bool:
        if not self._chat:
            return bool(choice.get("text"))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        return any(delta.get(key) for key in ("content", "reasoning_content", "reasoning"))


def error_object(payload: object) -> dict[str, Any]:
    """The error inside OpenAI's `{"error": {...}}`, vLLM's flat `{"object": "error", ...}`,
    `{"error": "text"}` or FastAPI's `{"detail": ...}`; `{}` when `payload` is none of those."""
    if not isinstance(payload, dict):
        return {}
    inner = payload.get("error")
    if isinstance(inner, dict):
        return inner
    if isinstance(inner, str):
        return {"message": inner}
    is_error = payload.get("object") == "error" or "message" in payload or "detail" in payload
    return payload if is_error else {}


def error_status(error: dict[str, Any]) -> str:
    """A record status for an in-stream error: `HTTP_<code>` for a numeric code (vLLM), a
    string code upper-cased (pdserve's `resource_exhausted` reads as its gRPC status), else the
    type as given, else STREAM_ERROR."""
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return f"HTTP_{code}"
    if isinstance(code, str) and code:
        return code.upper()
    error_type = error.get("type")
    return error_type if isinstance(error_type, str) and error_type else STREAM_ERROR


def error_message(error: dict[str, Any]) -> str:
    """The error's message (FastAPI's `detail` too), shortened to MAX_ERROR_CHARS."""
    for key in ("message", "detail"):
        if error.get(key):
            return str(error[key])[:MAX_ERROR_CHARS]
    return json.dumps(error)[:MAX_ERROR_CHARS] if error else ""
