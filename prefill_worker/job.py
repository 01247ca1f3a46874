"""State of one request on a prefill replica."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

from engine.model_runner import SequenceChunk
from engine.sampler import SamplingRow
from kvtransfer import TransferStats
from pdserve.messages import PrefillRequest, TokenLogprobs


@dataclass(frozen=True)
class FirstToken:
    token_id: int
    finish_reason: str
    queue_s: float
    prefill_s: float
    # Only when the request asked for log-probabilities.
    logprobs: TokenLogprobs | None = None


@dataclass
class PrefillJob:
    """One prompt from admission until its KV is handed off (or the request ends)."""

    request: PrefillRequest
    # Resolved by the batch loop with the first sampled token (or an error).
    first_token: asyncio.Future[FirstToken]
    enqueued_at: float = field(default_factory=time.monotonic)
    # Chained hashes of the prompt's full blocks (empty when prefix caching is off).
    block_hashes: list[bytes] = field(default_factory=list)
    block_table: list[int] | None = None
    # Leading prompt tokens whose KV came from the prefix cache: passes compute the rest.
    num_cached_tokens: int = 0
    # Leading prompt tokens whose KV is in the job's blocks (cached + computed by passes).
    num_computed_tokens: int = 0
    # Prompt tokens the job's current (or last) pass computes: a chunk of the rest.
    num_chunk_tokens: int = 0
    # When the job's first pass started (0 before).
    first_pass_at: float = 0.0
    # True while a forward pass or a KV send may still read this job's blocks.
    in_forward: bool = False
    sending: bool = False
    # Set when the request is aborted; stops a send in progress.
    cancel: threading.Event = field(default_factory=threading.Event)
    # The worker has finished with the job; whoever is last to touch the blocks frees them.
    released: bool = False
    # The KV send (a thread's future) and, for a layer-pipelined send started before the
    # pass, the first token it commits with once the pass has sampled it.
    send_task: asyncio.Future[TransferStats] | None = None
    first_token_for_send: concurrent.futures.Future[int] | None = None
    send_started_at: float = 0.0
    forward_done_at: float = 0.0

    @property
    def transfer_id(self) -> str:
        return self.request.transfer_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Prompt tokens passes compute (all but the cached prefix)."""
        return self.num_prompt_tokens - self.num_cached_tokens

    @property
    def num_prompt_tokens_left(self) -> int:
        """Prompt tokens no pass has computed yet."""
        return self.num_prompt_tokens - self.num_computed_tokens

    @property
    def is_last_chunk(self) -> bool:
        """Whether the current chunk ends the prompt (its pass samples the first token)."""
        return self.num_computed_tokens + self.num_chunk_tokens == self.num_prompt_tokens

    @property
    def chunk(self) -> SequenceChunk:
        """What the job's current pass computes: the next `num_chunk_tokens` prompt tokens."""
        start = self.num_computed_tokens
        token_ids = self.request.prompt_token_ids[start : start + self.num_chunk_tokens]
        return SequenceChunk(token_ids, start, self.block_table or [])

    @property
    def sampling_row(self) -> SamplingRow:
        """How the first token is sampled (after any tokens generated before a migration)."""
        request = self.request
        return SamplingRow(request.sampling, request.num_previous_tokens, request.eos_token_ids)

    def seconds_left(self) -> float:
        return self.request.deadline - time.time()
