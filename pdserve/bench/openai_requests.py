"""The JSON bodies the openai-* backends POST, and the text of chat prompts.

`openai-completions` sends the workload's prompt as it is: token ids as a JSON array
(`"prompt": [ids]`, which pdserve, vLLM and llama.cpp accept) or ShareGPT text.

`openai-chat` needs text: it sends one user message. ShareGPT prompts are text already.
Token-id prompts (synthetic, long-tail, the mix's long prompts) are decoded with `--tokenizer`
(a `tokenizers` JSON file, or a Hugging Face folder holding `tokenizer.json`), skipping special
tokens: deterministic, so a seed gives the same text on every run and against every server
using that tokenizer. The server re-tokenizes the text (which need not give the same ids) and
wraps it in its chat template, so the prompt it processes differs from the ids in length:
results report the server's `usage.prompt_tokens`. Without `--tokenizer`, BenchOptions refuses
token-id workloads for chat rather than inventing text.

Every body streams with `stream_options.include_usage`, is greedy (`temperature` 0, like the
grpc backend), sets `max_tokens` from the shape and, unless `--no-ignore-eos-param`, sends
`ignore_eos: true` (an extension of vLLM, llama.cpp and pdserve that makes every request
generate exactly `max_tokens`; a strict server rejects unknown fields).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.bench.options import OPENAI_CHAT, BenchOptions
from pdserve.bench.workload import RequestShape
from pdserve.errors import InvalidArgument

GREEDY_TEMPERATURE = 0.0
PromptDecoder = Callable[[Sequence[int]], str]


class RequestBuilder:
    """Builds the endpoint path and JSON body of each request for one backend and model.
    Stateless after construction; called on the runner's loop."""

    def __init__(
        self, backend: str, model: str, send_ignore_eos: bool, decode: PromptDecoder | None
    ) -> None:
        self._chat = backend == OPENAI_CHAT
        self._model = model
        self._send_ignore_eos = send_ignore_eos
        self._decode = decode

    @property
    def path(self) -> str:
        """The endpoint under the base URL."""
        return "/chat/completions" if self._chat else "/completions"

    @property
    def is_chat(self) -> bool:
        return self._chat

    @property
    def form(self) -> dict[str, Any]:
        """How requests are sent, for results.json."""
        if self._chat:
            prompt = "one user message: ShareGPT text, or token ids decoded with --tokenizer"
        else:
            prompt = "token ids as a JSON array, or ShareGPT text"
        return {
            "api": f"POST {self.path}",
            "prompt": prompt,
            "ignore_eos_sent": self._send_ignore_eos,
            "temperature": GREEDY_TEMPERATURE,
            "itl_over": "chunks",
        }

    def body(self, shape: RequestShape) -> bytes:
        """The encoded JSON body for `shape`. Raises InvalidArgument for a token-id prompt
        in chat without a decoder (BenchOptions normally refuses that earlier)."""
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": shape.max_tokens,
            "temperature": GREEDY_TEMPERATURE,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._send_ignore_eos:
            body["ignore_eos"] = True
        if self._chat:
            body["messages"] = [{"role": "user", "content": self._text(shape.prompt)}]
        else:
            body["prompt"] = shape.prompt if isinstance(shape.prompt, str) else list(shape.prompt)
        return json.dumps(body).encode()

    def _text(self, prompt: str | tuple[int, ...]) -> str:
        if isinstance(prompt, str):
            return prompt
        if self._decode is None:
            raise InvalidArgument("--tokenizer", "chat needs text to send token-id prompts")
        return self._decode(prompt)


def load_prompt_decoder(path: str, vocab_high: int) -> PromptDecoder:
    """A decoder of token ids to text from a `tokenizers` JSON file or a folder holding
    `tokenizer.json`. Blocks on file I/O. Raises InvalidArgument("--tokenizer", ...) when it
    cannot be loaded, or ("--vocab-high", ...) when the prompts' ids exceed its vocabulary."""
    from tokenizers import Tokenizer  # only chat runs need it

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as exc:  # tokenizers raises plain Exception for unreadable or bad files
        raise InvalidArgument("--tokenizer", f"cannot load {file}: {exc}") from None
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_high > vocab_size:
        raise InvalidArgument(
            "--vocab-high", f"{vocab_high} exceeds the tokenizer's {vocab_size} tokens"
        )

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return decode


def decoder_for(options: BenchOptions) -> PromptDecoder | None:
    """The prompt decoder `options` asks for (chat with --tokenizer), else None."""
    if options.backend != OPENAI_CHAT or options.tokenizer is None:
        return None
    return load_prompt_decoder(options.tokenizer, options.vocab_high)
