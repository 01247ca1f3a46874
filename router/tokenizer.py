"""The router's tokenizer: the model's tokenizer.json loaded with `tokenizers` alone, and its
chat template.

The router must not import torch, and `transformers` would, so the replicas ship the fast
tokenizer's JSON in `ModelInfo.tokenizer_json` (and the chat template beside it) and the router
rebuilds them here. Encoding a text prompt applies the tokenizer's own post-processor (BOS
etc.), as `AutoTokenizer(text).input_ids` does; a rendered chat is encoded without it, as
`apply_chat_template(..., tokenize=True)` does (the template writes its own special tokens).
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from pdserve.errors import Internal, InvalidArgument
from pdserve.messages import ModelInfo
from router.chat_template import ChatTemplate
from router.detokenizer import IncrementalDetokenizer


class RouterTokenizer:
    """Encodes prompts and creates per-request detokenizers.

    Built once at router start-up from the `ModelInfo` a replica reports; read-only afterwards
    and safe to share between request tasks and threads. `encode` runs the Rust tokenizer
    synchronously, releasing the GIL meanwhile (CPU time grows with the text; callers bound
    the text size first and run long ones off the event loop).
    """

    def __init__(
        self, tokenizer: Tokenizer, info: ModelInfo, chat_template: ChatTemplate | None = None
    ) -> None:
        # A tokenizer.json may carry truncation or padding settings; transformers switches them
        # off for a plain call, and silently truncated prompts would be wrong, so do the same.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._vocab_size = info.vocab_size
        self._eos_token_ids = list(info.eos_token_ids)
        self._max_context_tokens = info.max_context_tokens
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._max_chars_per_token = max((len(token) for token in vocab), default=1)
        self._chat_template = chat_template or ChatTemplate.from_model_info(info)

    @classmethod
    def from_model_info(cls, info: ModelInfo) -> RouterTokenizer:
        """Parses `info.tokenizer_json`; raises `Internal` if it is not a tokenizers JSON."""
        try:
            tokenizer = Tokenizer.from_str(info.tokenizer_json)
        except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
            raise Internal(f"model info: tokenizer_json is not a valid tokenizer: {exc}") from None
        return cls(tokenizer, info)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (embedding rows): valid ids are [0, vocab_size)."""
        return self._vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def max_context_tokens(self) -> int:
        """The model's own context limit (the config may lower it further)."""
        return self._max_context_tokens

    @property
    def max_chars_per_token(self) -> int:
        """Characters of the longest vocabulary entry, added tokens included: a text longer
        than `n * max_chars_per_token` characters (give or take a normalizer) encodes to more
        than `n` tokens, so validation can refuse it without tokenizing it.

        Why that holds: a byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) spells every entry
        with one character per byte and drops no byte of the text, so characters <= UTF-8 bytes
        <= tokens * the longest entry; a byte-fallback SentencePiece model (Llama 2, Mistral)
        likewise covers every character with entries no longer than the longest. A normalizer
        may compose characters (NFC turns "e" + U+0301 into one), hence the margin the caller
        adds (`router.validation.PROMPT_CHARS_MARGIN`). Not covered: a tokenizer that drops
        text (an `unk` entry for a long unknown word, added tokens that swallow whitespace);
        there it could refuse a pathological prompt that fits, such as megabytes of spaces.
        """
        return self._max_chars_per_token

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template.available

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens added unless asked not to.
        Other threads (the event loop) run while it encodes."""
        # A batch of one: `Tokenizer.encode` holds the GIL throughout, `encode_batch` releases it.
        (encoding,) = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return encoding.ids

    def render_chat(
        self, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None
    ) -> str:
        """The prompt text of a conversation, with the generation prompt added. Raises
        `InvalidArgument` (field `prompt.messages` or `prompt.messages.chat_template_kwargs`)
        when the model has no usable template or the template refuses the conversation."""
        try:
            return self._chat_template.render(
                messages, add_generation_prompt=True, template_kwargs=template_kwargs
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f"prompt.{exc.field}", exc.message.partition(": ")[2]) from None

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of complete `token_ids` (ids must be non-negative; unknown ids are dropped)."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's generated tokens."""
        return IncrementalDetokenizer(self._tokenizer, prompt_token_ids, skip_special_tokens)
