"""Incremental detokenization of one request's generated tokens.

Decoding tokens one at a time is wrong in two ways: a multi-byte UTF-8 character split across
tokens decodes to U+FFFD halves, and tokenizers that strip or add a leading space (SentencePiece
`▁`, byte-level BPE with a prefix space) decode a token differently alone than in context. So
each push decodes a short window of tokens (`prefix_offset` up to the end) and emits the part
past the text of the already-read tokens (`prefix_offset` up to `read_offset`). Text that ends
in U+FFFD is held back until a later token completes the character. The window starts in the
tail of the prompt, so the first generated token is decoded in context too.

Guarantee: the concatenation of all deltas and `flush()` equals
`decode(prompt + generated)[len(decode(prompt)):]`; for byte-level BPE tokenizers (GPT-2,
SmolLM2, Qwen) that is exactly `decode(generated)`.
"""

from __future__ import annotations

from tokenizers import Tokenizer

# Prompt tokens decoded with the first generated tokens: enough to settle any leading-space
# rule and to start on a character boundary for the usual tokenizers.
NUM_CONTEXT_TOKENS = 5
MAX_CONTEXT_TOKENS = 12
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas.

    Owned by the router task that streams the request; not thread-safe. `push` and `flush`
    call the Rust tokenizer synchronously (microseconds for the short window). Ids the tokenizer
    does not know decode to nothing; negative ids raise OverflowError (models never emit them).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = self._context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._num_prefix_chars = len(self._decode(0, self._read_offset))
        self._num_generated_tokens = 0

    @property
    def num_generated_tokens(self) -> int:
        return self._num_generated_tokens

    def push(self, token_ids: list[int]) -> str:
        """Adds generated tokens; returns the text they complete (possibly "")."""
        self._token_ids.extend(token_ids)
        self._num_generated_tokens += len(token_ids)
        text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(text) <= self._num_prefix_chars or text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Returns text still held back (e.g. a trailing invalid byte) at the end of generation.

        Call once, after the last push; whatever it returns is final.
        """
        text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(text) <= self._num_prefix_chars:
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        delta = text[self._num_prefix_chars :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self._num_prefix_chars = len(self._decode(self._prefix_offset, self._read_offset))
        # Drop ids before the window so a long generation keeps a short list.
        del self._token_ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return delta

    def _context(self, prompt_token_ids: list[int]) -> list[int]:
        # A window that decodes to text ending in U+FFFD would misalign the diff: it starts
        # inside a byte-fallback run or the prompt itself ends inside a character. Widen it a
        # little; failing that, generated text is decoded on its own.
        for num_context in range(NUM_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS + 1):
            context = prompt_token_ids[max(len(prompt_token_ids) - num_context, 0) :]
            text = self._tokenizer.decode(context, skip_special_tokens=self._skip_special_tokens)
            if not text.endswith(_REPLACEMENT):
                return list(context)
            if len(context) == len(prompt_token_ids):
                break
        return []

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(
            self._token_ids[start:end], skip_special_tokens=self._skip_special_tokens
        )
