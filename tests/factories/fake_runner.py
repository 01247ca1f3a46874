"""A `ModelRunner` stand-in for batch-loop tests: records every step's chunks, predicts the
next token as the chunk's last token plus one, and can hold or fail chosen steps."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from engine.model_runner import SequenceChunk

FAKE_VOCAB = 1000
HOLD_TIMEOUT_S = 5.0


class FakeRunner:
    """`forward` returns logits whose argmax is `choose(chunk)`, by default
    `(chunk.token_ids[-1] + 1) % FAKE_VOCAB`; every other token has logit 0. With `hold=True`
    every forward waits (on the step thread) for `release()`; the calls listed in `fail_calls`
    (1-based) raise."""

    def __init__(
        self, hold: bool = False, choose: Callable[[SequenceChunk], int] | None = None
    ) -> None:
        self.calls: list[list[SequenceChunk]] = []
        self.fail_calls: set[int] = set()
        self._hold = hold
        self._allowed = threading.Semaphore(0)
        self._choose = choose or next_token

    def release(self, num_steps: int = 1) -> None:
        for _ in range(num_steps):
            self._allowed.release()

    def forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        self.calls.append(list(chunks))
        call = len(self.calls)
        if self._hold and not self._allowed.acquire(timeout=HOLD_TIMEOUT_S):
            raise TimeoutError("the test never released this step")
        if call in self.fail_calls:
            raise RuntimeError(f"forward {call} exploded")
        logits = torch.zeros(len(chunks), FAKE_VOCAB)
        for row, chunk in enumerate(chunks):
            logits[row, self._choose(chunk)] = 10.0
        return logits


def next_token(chunk: SequenceChunk) -> int:
    """The fake model's default prediction: the chunk's last token plus one."""
    return (chunk.token_ids[-1] + 1) % FAKE_VOCAB


def fake_logits(chosen: int) -> torch.Tensor:
    """The row `FakeRunner.forward` returns when it predicts `chosen`, `[FAKE_VOCAB]`."""
    logits = torch.zeros(FAKE_VOCAB)
    logits[chosen] = 10.0
    return logits
