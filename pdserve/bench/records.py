"""What the load generator measured about one request, and the latencies derived from it.

The raw facts are the send and end times and, for every message that carried tokens, when it
arrived and how many tokens it carried. TTFT, inter-token gaps, TPOT and end-to-end latency are
derived from them, so `results.json` keeps both and any other statistic can be recomputed.

What a "message" is depends on the backend (`message_unit`): over gRPC each message says how
many tokens it carried (TOKENS), so gaps are per token. An OpenAI-compatible stream carries text
chunks whose token count is not on the wire (CHUNKS): each content chunk is recorded as one
message of 1, so inter-token gaps are gaps between chunk arrivals, while the true token count
(from the server's `usage`, see `num_tokens_source`) sets TPOT and throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.bench.stats import percentile
from pdserve.v1 import pdserve_pb2

OK = "OK"
NO_FINAL = "NO_FINAL"  # the stream ended without a final message (a server bug)
PENDING = "PENDING"
TOKENS = "tokens"  # message_num_tokens are token counts (gRPC)
CHUNKS = "chunks"  # one entry of 1 per content chunk; token counts unknown (OpenAI SSE)
USAGE = "usage"  # num_completion_tokens is the server's count
COUNTED = "counted"  # num_completion_tokens counts the stream's chunks (no usage came)
_ROUND_DIGITS = 6  # microseconds; keeps results.json compact


@dataclass
class RequestRecord:
    """One request. Times ending in `_s` without "offset" are seconds since the benchmark
    started; `message_offsets_s` are seconds since this request was sent."""

    index: int
    kind: str
    max_tokens: int
    scheduled_s: float
    num_prompt_tokens: int | None = None
    send_s: float = 0.0
    end_s: float = 0.0
    status: str = PENDING
    error: str = ""
    num_completion_tokens: int = 0
    message_offsets_s: list[float] = field(default_factory=list)
    message_num_tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    request_id: str = ""
    server_timings: dict[str, float] = field(default_factory=dict)
    served_by: dict[str, Any] = field(default_factory=dict)
    message_unit: str = TOKENS
    num_tokens_source: str = ""  # USAGE or COUNTED once the request finished OK

    def add_message(self, offset_s: float, num_tokens: int) -> None:
        """Records a message that carried `num_tokens` (> 0) tokens `offset_s` after sending."""
        self.message_offsets_s.append(offset_s)
        self.message_num_tokens.append(num_tokens)

    def apply_final(self, final: pdserve_pb2.FinalInfo) -> None:
        """Takes usage, finish reason, the server's timings and served_by from the final
        message and marks the request OK."""
        self.status = OK
        self.num_tokens_source = USAGE
        self.finish_reason = pdserve_pb2.FinishReason.Name(final.finish_reason).removeprefix(
            "FINISH_REASON_"
        )
        self.request_id = final.request_id
        self.num_prompt_tokens = final.usage.prompt_tokens
        self.num_completion_tokens = final.usage.completion_tokens
        timings = final.timings
        self.server_timings = {
            name: getattr(timings, name)
            for name in ("queue_s", "prefill_s", "kv_transfer_s", "decode_s",
                         "time_to_first_token_s", "total_s")
        }  # fmt: skip
        served = final.served_by
        self.served_by = {
            "mode": served.mode,
            "kv_transport": served.kv_transport,
            "prefill_replica": served.prefill_replica,
            "decode_replica": served.decode_replica,
            "kv_bytes": served.kv_bytes,
            "num_migrations": served.num_migrations,
        }

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def num_tokens_received(self) -> int:
        return sum(self.message_num_tokens)

    @property
    def ttft_s(self) -> float | None:
        """From sending to the first token-carrying message; None if no token arrived."""
        return self.message_offsets_s[0] if self.message_offsets_s else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.send_s

    @property
    def num_output_tokens(self) -> int:
        """Tokens the stream delivered: counted on the wire for TOKENS messages; for CHUNKS,
        the server's usage when it sent one, else the number of chunks."""
        if self.message_unit == CHUNKS and self.num_tokens_source == USAGE:
            return self.num_completion_tokens
        return self.num_tokens_received

    @property
    def tpot_s(self) -> float | None:
        """(last token time - first token time) / (tokens - 1); None below two tokens or
        without a token-carrying message."""
        if self.num_output_tokens < 2 or not self.message_offsets_s:
            return None
        span_s = self.message_offsets_s[-1] - self.message_offsets_s[0]
        return span_s / (self.num_output_tokens - 1)

    def itl_gaps_s(self) -> list[float]:
        """One gap per token after the first: the time between token-carrying messages, split
        evenly over the k tokens of a message that carried k. Extra tokens in the first message
        arrived with the first token and count as gaps of 0. They sum to last - first. For
        CHUNKS messages (each counted as 1) these are the gaps between chunk arrivals."""
        if not self.message_num_tokens:
            return []
        gaps = [0.0] * (self.message_num_tokens[0] - 1)
        for j in range(1, len(self.message_offsets_s)):
            num_tokens = self.message_num_tokens[j]
            gap_s = (self.message_offsets_s[j] - self.message_offsets_s[j - 1]) / num_tokens
            gaps.extend([gap_s] * num_tokens)
        return gaps

    def gap_end_times_s(self) -> list[float]:
        """When each gap of `itl_gaps_s` ended, in seconds since the benchmark started."""
        if not self.message_num_tokens:
            return []
        times = [self.send_s + self.message_offsets_s[0]] * (self.message_num_tokens[0] - 1)
        for j in range(1, len(self.message_offsets_s)):
            times.extend([self.send_s + self.message_offsets_s[j]] * self.message_num_tokens[j])
        return times

    def itl_p99_s(self) -> float | None:
        """This request's own p99 inter-token gap; None when it has no gaps."""
        gaps = self.itl_gaps_s()
        return percentile(gaps, 99) if gaps else None

    def to_dict(self) -> dict[str, Any]:
        """The raw facts plus the derived latencies, JSON-ready."""
        return {
            "index": self.index,
            "kind": self.kind,
            "status": self.status,
            "error": self.error,
            "max_tokens": self.max_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_completion_tokens": self.num_completion_tokens,
            "scheduled_s": _round(self.scheduled_s),
            "send_s": _round(self.send_s),
            "end_s": _round(self.end_s),
            "ttft_s": _round(self.ttft_s),
            "tpot_s": _round(self.tpot_s),
            "e2e_s": _round(self.e2e_s),
            "itl_s": [_round(gap) for gap in self.itl_gaps_s()],
            "message_offsets_s": [_round(offset) for offset in self.message_offsets_s],
            "message_num_tokens": list(self.message_num_tokens),
            "message_unit": self.message_unit,
            "num_tokens_source": self.num_tokens_source,
            "finish_reason": self.finish_reason,
            "request_id": self.request_id,
            "server_timings": dict(self.server_timings),
            "served_by": dict(self.served_by),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, _ROUND_DIGITS)
