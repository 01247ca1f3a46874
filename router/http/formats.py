"""OpenAI's response shapes for chat and completions: whole responses and stream chunks.

A `ResponseFormat` turns one choice's text, token log-probabilities and end into the JSON
objects of its endpoint; `router.http.generation` decides when each is sent. Every finished
choice carries one extra field, `pdserve`: the request id of its sequence, the stage timings
and which mode, transport and replicas served it.
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.messages import TokenLogprobs
from router.request_flow import Completion
from router.tokenizer import RouterTokenizer

# JSON has no -inf; OpenAI-compatible servers send a large negative number instead.
MIN_LOGPROB = -9999.0
# pdserve's finish reasons that OpenAI's API spells differently: a choice the server ended
# early (a drain cut) is `abort`, as vLLM reports an aborted request.
OPENAI_FINISH_REASONS = {"cancelled": "abort"}


class ResponseFormat:
    """Shapes shared by both endpoints; subclasses fill in the per-endpoint parts.

    One instance per request (it holds the response id, model name and creation time)."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, tokenizer: RouterTokenizer, model: str, response_id: str) -> None:
        self._tokenizer = tokenizer
        self._model = model
        self.response_id = response_id
        self._created = int(time.time())

    def response(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        """A whole (non-streaming) response."""
        return {**self._header(self.object_name), "choices": choices, "usage": usage}

    def chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        """A stream chunk carrying one choice's update (None: no choice, for usage)."""
        return {**self._header(self.chunk_object_name), "choices": [choice] if choice else []}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.chunk(None), "usage": usage}

    def start_choice(self, index: int) -> dict[str, Any] | None:
        """The update that opens a choice's stream (None: the endpoint sends none)."""
        return None

    def delta_choice(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        completion: Completion | None,
    ) -> dict[str, Any]:
        """A stream update: new text, its tokens' logprobs (None: not asked), and on the last
        update the finish reason and `pdserve`."""
        raise NotImplementedError

    def full_choice(
        self, index: int, text: str, logprobs: list[TokenLogprobs] | None, completion: Completion
    ) -> dict[str, Any]:
        """A finished choice of a whole response."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _header(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": object_name,
            "created": self._created,
            "model": self._model,
        }


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def start_choice(self, index: int) -> dict[str, Any] | None:
        return _choice(index, delta={"role": "assistant", "content": ""}, logprobs=None)

    def delta_choice(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        completion: Completion | None,
    ) -> dict[str, Any]:
        delta = {"content": text} if text or completion is None else {}
        return _choice(index, delta=delta, logprobs=self._logprobs(logprobs),
                       completion=completion)

    def full_choice(
        self, index: int, text: str, logprobs: list[TokenLogprobs] | None, completion: Completion
    ) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return _choice(index, message=message, logprobs=self._logprobs(logprobs),
                       completion=completion)

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [self._chat_entry(entry) for entry in entries], "refusal": None}

    def _chat_entry(self, entry: TokenLogprobs) -> dict[str, Any]:
        top = [
            self._token_logprob(token_id, logprob)
            for token_id, logprob in zip(entry.top_token_ids, entry.top_logprobs)
        ]
        return {**self._token_logprob(entry.token_id, entry.logprob), "top_logprobs": top}

    def _token_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {
            "token": text,
            "logprob": max(logprob, MIN_LOGPROB),
            "bytes": list(text.encode("utf-8")),
        }


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, tokenizer: RouterTokenizer, model: str, response_id: str) -> None:
        super().__init__(tokenizer, model, response_id)
        # Characters of completion text each choice's logprobs have covered (text_offset).
        self._offsets: dict[int, int] = {}

    def delta_choice(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        completion: Completion | None,
    ) -> dict[str, Any]:
        return _choice(index, text=text, logprobs=self._logprobs(index, logprobs),
                       completion=completion)

    def full_choice(
        self, index: int, text: str, logprobs: list[TokenLogprobs] | None, completion: Completion
    ) -> dict[str, Any]:
        return self.delta_choice(index, text, logprobs, completion)

    def _logprobs(self, index: int, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        """The legacy shape; `text_offset` counts the characters of the tokens' own texts."""
        if entries is None:
            return None
        tokens = [self.token_text(entry.token_id) for entry in entries]
        offsets = []
        offset = self._offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [max(entry.logprob, MIN_LOGPROB) for entry in entries],
            "top_logprobs": [
                {
                    self.token_text(token_id): max(logprob, MIN_LOGPROB)
                    for token_id, logprob in zip(entry.top_token_ids, entry.top_logprobs)
                }
                for entry in entries
            ],
            "text_offset": offsets,
        }


def usage(completions: list[Completion]) -> dict[str, Any]:
    """Token counts of a whole request: the prompt once, every choice's tokens."""
    first = completions[0]
    completion_tokens = sum(c.num_completion_tokens for c in completions)
    return {
        "prompt_tokens": first.num_prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": first.num_prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": first.num_cached_tokens},
    }


def served_info(completion: Completion) -> dict[str, Any]:
    """The documented `pdserve` field of a finished choice."""
    return {
        "request_id": completion.request_id,
        "timings": dict(completion.timings),
        "served_by": {
            "mode": completion.mode,
            "kv_transport": completion.kv_transport,
            "prefill_replica": completion.prefill_replica,
            "decode_replica": completion.decode_replica,
            "kv_bytes": completion.kv_bytes,
            "num_migrations": completion.num_migrations,
            "num_preemptions": completion.num_preemptions,
        },
    }


def _choice(
    index: int, *, logprobs: dict[str, Any] | None, completion: Completion | None = None,
    **content: Any,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, **content, "logprobs": logprobs}
    choice["finish_reason"] = (
        None if completion is None
        else OPENAI_FINISH_REASONS.get(completion.finish_reason, completion.finish_reason)
    )
    if completion is not None:
        choice["pdserve"] = served_info(completion)
    return choice
