"""The router's tokenizer: the model's tokenizer.json loaded with `tokenizers` alone.

The router must not import torch, and `transformers` would, so the replicas ship the fast
tokenizer's JSON in `ModelInfo.tokenizer_json` and the router rebuilds it here. Encoding applies
the tokenizer's own post-processor (BOS etc.), as `AutoTokenizer(text).input_ids` does.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from pdserve.errors import Internal
from pdserve.messages import ModelInfo
from router.detokenizer import IncrementalDetokenizer


class RouterTokenizer:
    """Encodes prompts and creates per-request detokenizers.

    Built once at router start-up from the `ModelInfo` a replica reports; read-only afterwards
    and safe to share between request tasks. `encode` runs the Rust tokenizer synchronously
    (CPU time grows with the text; callers bound the text size first).
    """

    def __init__(self, tokenizer: Tokenizer, info: ModelInfo) -> None:
        # A tokenizer.json may carry truncation or padding settings; transformers switches them
        # off for a plain call, and silently truncated prompts would be wrong, so do the same.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._vocab_size = info.vocab_size
        self._eos_token_ids = list(info.eos_token_ids)
        self._max_context_tokens = info.max_context_tokens

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

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the tokenizer's special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of complete `token_ids` (ids must be non-negative; unknown ids are dropped)."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(
        self, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request's generated tokens."""
        return IncrementalDetokenizer(self._tokenizer, prompt_token_ids, skip_special_tokens)
