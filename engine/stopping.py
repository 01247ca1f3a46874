"""When a sequence stops: shared by prefill (first token) and decode (every later token)."""

from __future__ import annotations

from pdserve.messages import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def finish_reason(
    token_id: int, num_generated: int, sampling: SamplingParams, eos_token_ids: list[int]
) -> str:
    """Returns "stop", "length" or "" (not finished) after `token_id` became the
    `num_generated`-th generated token."""
    if token_id in sampling.stop_token_ids:
        return FINISH_STOP
    if not sampling.ignore_eos and token_id in eos_token_ids:
        return FINISH_STOP
    if num_generated >= sampling.max_tokens:
        return FINISH_LENGTH
    return ""
