"""Generated token ids in, client-visible text out: detokenizer plus stop strings."""

from __future__ import annotations

from router.stop_strings import StopStringMatcher
from router.tokenizer import RouterTokenizer


class TextOutput:
    """One request's text stream. `stopped` turns True when a stop string completed.

    Stop strings are looked for only in the text of tokens after the first `min_tokens`
    (vLLM's rule: nothing stops a request before min_tokens)."""

    def __init__(
        self,
        tokenizer: RouterTokenizer,
        prompt_ids: list[int],
        stop: list[str],
        min_tokens: int = 0,
    ) -> None:
        self._detokenizer = tokenizer.detokenizer(prompt_ids)
        self._stop = StopStringMatcher(stop)
        self._min_tokens = min_tokens
        self.num_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def push(self, token_ids: list[int]) -> str:
        """Text safe to show after these tokens (may be "")."""
        self.num_tokens += len(token_ids)
        delta = self._detokenizer.push(token_ids)
        if self.num_tokens < self._min_tokens:
            return delta
        text, _ = self._stop.feed(delta)
        return text

    def finish(self) -> str:
        """The held-back rest, when generation ended for a reason other than a stop string."""
        if self.stopped:
            return ""
        text, _ = self._stop.feed(self._detokenizer.flush())
        return text + self._stop.flush()
