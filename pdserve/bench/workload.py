"""Request shapes: what each benchmark request asks for (prompt and max_tokens).

A workload hands out shapes one at a time from its own seeded generator, so the n-th shape is
the same on every run with the same seed, whatever the arrival process or timing. Every shape
is sent with `ignore_eos` (unless an openai-* run is told `--no-ignore-eos-param`), so a request
generates exactly `max_tokens` tokens unless it fails.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pdserve.bench.lengths import LengthDistribution
from pdserve.bench.sharegpt import Conversation
from pdserve.errors import InvalidArgument

MAIN = "main"  # the steady arrival process
LONG = "long"  # the periodic long prompts of `--mix`


def ordered_kinds(kinds: set[str]) -> list[str]:
    """Request kinds in report order: main first, then long, then any other by name."""
    return sorted(kinds, key=lambda kind: ({MAIN: 0, LONG: 1}.get(kind, 2), kind))


@dataclass(frozen=True)
class RequestShape:
    """One request to send: a text prompt or token ids, and how many tokens to generate."""

    kind: str
    prompt: str | tuple[int, ...]
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int | None:
        """Prompt length when sent as token ids; None for text (the server's usage says)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


class Workload(Protocol):
    """A seeded source of request shapes. Called from the runner's event loop only."""

    def next_shape(self) -> RequestShape: ...


def seeded_rng(seed: int, stream: str) -> random.Random:
    """An independent generator per stream of draws, so adding one stream (say the long
    prompts) does not shift the draws of another."""
    return random.Random(f"{seed}:{stream}")


class SyntheticWorkload:
    """Prompts of random token ids in [`vocab_low`, `vocab_high`) with lengths drawn from
    `prompt_len`, and `max_tokens` drawn from `output_len`."""

    def __init__(
        self,
        prompt_len: LengthDistribution,
        output_len: LengthDistribution,
        *,
        vocab_low: int,
        vocab_high: int,
        seed: int,
        kind: str = MAIN,
    ) -> None:
        if not 0 <= vocab_low < vocab_high:
            raise InvalidArgument(
                "--vocab-low", f"need 0 <= low < high, got {vocab_low}..{vocab_high}"
            )
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.kind = kind
        self._vocab_low = vocab_low
        self._vocab_high = vocab_high
        self._rng = seeded_rng(seed, kind)

    @property
    def max_context_tokens(self) -> int:
        """The largest prompt + max_tokens this workload can produce."""
        return self.prompt_len.max_tokens + self.output_len.max_tokens

    def next_shape(self) -> RequestShape:
        num_prompt_tokens = self.prompt_len.sample(self._rng)
        max_tokens = self.output_len.sample(self._rng)
        prompt = tuple(
            self._rng.randrange(self._vocab_low, self._vocab_high) for _ in range(num_prompt_tokens)
        )
        return RequestShape(self.kind, prompt, max_tokens)


class ShareGPTWorkload:
    """Conversations drawn at random (with replacement) from a ShareGPT file.

    Conversations whose estimated prompt + reply exceed `max_context_tokens` are dropped
    (the server would refuse them); replies are capped at `max_output_tokens`. Raises
    InvalidArgument when nothing fits.
    """

    def __init__(
        self,
        conversations: Sequence[Conversation],
        *,
        seed: int,
        max_context_tokens: int,
        max_output_tokens: int,
    ) -> None:
        self.conversations = [
            c for c in conversations
            if c.num_prompt_tokens_estimate + min(c.num_output_tokens_estimate, max_output_tokens)
            <= max_context_tokens
        ]  # fmt: skip
        if not self.conversations:
            raise InvalidArgument(
                "--sharegpt", f"no conversation fits the server's {max_context_tokens} tokens"
            )
        self.num_dropped = len(conversations) - len(self.conversations)
        self._max_output_tokens = max_output_tokens
        self._rng = seeded_rng(seed, "sharegpt")

    def next_shape(self) -> RequestShape:
        conversation = self._rng.choice(self.conversations)
        max_tokens = min(conversation.num_output_tokens_estimate, self._max_output_tokens)
        return RequestShape(MAIN, conversation.prompt, max_tokens)
