"""State of one request on a decode replica."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum

from pdserve.messages import DecodeEvent, DecodeRequest


class SequenceState(Enum):
    # Blocks reserved; the KV transfer may be on its way.
    RESERVED = "reserved"
    # The router's generate call is waiting for the KV to land.
    AWAITING_KV = "awaiting_kv"
    # In the running batch.
    RUNNING = "running"
    # Finished or aborted; blocks are freed once no step reads them.
    DONE = "done"


@dataclass
class DecodeSequence:
    transfer_id: str
    request_id: str
    num_prompt_tokens: int
    block_table: list[int]
    # Resolved with the first token id when the KV transfer commits (or with an error).
    kv_ready: asyncio.Future[int]
    state: SequenceState = SequenceState.RESERVED
    request: DecodeRequest | None = None
    # Generated token ids, starting with the first token sampled by prefill.
    token_ids: list[int] = field(default_factory=list)
    events: asyncio.Queue[DecodeEvent] = field(default_factory=asyncio.Queue)
    # True while a decode step may read or write this sequence's blocks.
    in_step: bool = False
    # Set by abort(): whatever stage notices it next ends the request.
    aborted: bool = False
    reserved_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    # From the reservation: see `service_order`.
    priority: int = 0
    admitted_at: float = 0.0
    # Reservations made on this replica before this one (breaks ties of the two above).
    arrival_index: int = 0
    # Its client is not reading its stream (the router's `mark_reader`): served last.
    reader_stalled: bool = False

    @property
    def num_generated(self) -> int:
        """Tokens generated for the request so far, including those before a migration."""
        previous = self.request.num_previous_tokens if self.request is not None else 0
        return previous + len(self.token_ids)

    @property
    def num_context_tokens(self) -> int:
        """Tokens whose KV is (or after this step will be) in the cache, plus the last token.
        `num_prompt_tokens` already counts tokens generated before a migration."""
        return self.num_prompt_tokens + len(self.token_ids)

    @property
    def service_order(self) -> tuple[bool, int, float, int]:
        """Sorts the sequence served first first; preemption takes its victims from the other
        end and never takes the first running one (`decode_worker.kv_growth`)."""
        return (self.reader_stalled, self.priority, self.admitted_at, self.arrival_index)

    @property
    def fault_key(self) -> list[int]:
        """What `FaultInjector` matches: the prompt's first token id."""
        return [self.request.prompt_first_token_id] if self.request is not None else []

    def seconds_left(self) -> float:
        assert self.request is not None, "only attached sequences have a deadline"
        return self.request.deadline - time.time()
