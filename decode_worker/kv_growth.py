"""On-demand KV growth and preemption by recompute, shared by the decode and colocated loops.

With `kv_cache.reservation: on_demand` a request gets blocks for its prompt plus a small margin
(`reserve_new_tokens`) when it arrives, and each running sequence gains a block when its next
token needs one. Before every step the batch loop (on the event loop, between steps: no pass
holds any block) asks `KVGrowth.plan` to give each sequence of the step the slot that step
writes: the KV of the token it feeds, at position `num_context_tokens - 1`.

When no block is free, running sequences are preempted in the reverse of the order in which
they are served. That order (`service_order`) is: sequences whose client reads its stream
before stalled readers (the router marks a request whose client has accepted no data for
`timeouts.reader_slow_s`: its KV is better spent on a client that reads), then lower
`priority` value first, then earlier `admitted_at` (the router's admission time, kept across
re-prefills), then earlier arrival on this replica. The sequence served first by that order is
never preempted, so it always finishes. A preempted sequence's blocks are freed at once and
the loop ends its stream with a `preempted` event; the router re-prefills prompt + generated
tokens and continues the stream. A sequence that finds no victim (it is served first and the
other blocks belong to reservations still waiting for their KV, or to prompts being
prefilled) sits the step out and is retried at the next one. Only running sequences are
victims: a reservation's transfer may be writing its blocks, a prompt's prefill is not done.

`full` reservations never grow, so the loops then run without a `KVGrowth`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from engine.block_manager import BlockManager
from pdserve.config import DecodeKVCacheConfig
from pdserve.errors import InvalidArgument
from pdserve.metrics import ReplicaMetrics

logger = logging.getLogger(__name__)


class Growable(Protocol):
    """What growth and preemption read of a sequence (`DecodeSequence`, `ColocatedSequence`)."""

    @property
    def transfer_id(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    @property
    def num_context_tokens(self) -> int: ...

    @property
    def num_generated(self) -> int: ...

    @property
    def in_step(self) -> bool: ...

    @property
    def service_order(self) -> tuple[bool, int, float, int]: ...

    @property
    def reader_stalled(self) -> bool: ...


SeqT = TypeVar("SeqT", bound=Growable)


@dataclass
class GrowthPlan(Generic[SeqT]):
    """What one growth pass decided; the loop applies it before the step."""

    # Sequences of the batch whose tables now cover this step's token, in batch order.
    ready: list[SeqT] = field(default_factory=list)
    # Running sequences whose blocks were freed: the loop takes them out and ends their streams.
    preempted: list[SeqT] = field(default_factory=list)
    # No free block and no victim: they sit this step out and are retried at the next one.
    stalled: list[SeqT] = field(default_factory=list)
    # Need more blocks than the whole cache has: they can never go on here.
    too_long: list[SeqT] = field(default_factory=list)


class KVGrowth(Generic[SeqT]):
    """Grows the block tables of a step's sequences, preempting others when the cache is full.
    Event loop only; owns nothing but its counter (the block manager does the accounting)."""

    def __init__(self, blocks: BlockManager, metrics: ReplicaMetrics) -> None:
        self._blocks = blocks
        self._metrics = metrics
        self.num_preemptions = 0

    def plan(self, batch: Sequence[SeqT], running: Iterable[SeqT]) -> GrowthPlan[SeqT]:
        """Gives every sequence of `batch` (a subset of `running`) the blocks its next token
        needs. Called by the batch loop between steps, when no step holds any block of
        `running`. Mutates the block manager: grown tables, and the freed blocks of the
        preempted sequences (counted and logged here). Raises nothing."""
        order = sorted(running, key=_service_order)
        # Victims are taken from the end; the one served first is never one.
        victims = order[1:]
        plan: GrowthPlan[SeqT] = GrowthPlan()
        grown: set[str] = set()
        # Oldest first: a sequence only ever preempts sequences served after it (or itself),
        # so one that grew in this pass is never a later victim of it.
        for seq in sorted(batch, key=_service_order):
            if any(victim is seq for victim in plan.preempted):
                continue
            if self._blocks.blocks_needed(seq.num_context_tokens) > self._blocks.num_total_blocks:
                plan.too_long.append(seq)
                # It ends anyway: freeing its blocks is no preemption.
                victims = [victim for victim in victims if victim is not seq]
                continue
            if self._grow(seq, victims, plan):
                grown.add(seq.transfer_id)
        plan.ready = [seq for seq in batch if seq.transfer_id in grown]
        return plan

    def too_long_error(self, seq: SeqT) -> InvalidArgument:
        """The end of a sequence that outgrew this replica's whole cache (`too_long`)."""
        blocks = self._blocks
        return InvalidArgument(
            "max_tokens", f"the sequence reached {seq.num_context_tokens} tokens, more than "
            f"this replica's whole KV cache holds ({blocks.num_total_blocks} blocks of "
            f"{blocks.block_size})",
        )

    def _grow(self, seq: SeqT, victims: list[SeqT], plan: GrowthPlan[SeqT]) -> bool:
        """Preempts victims, lowest in the service order first, until `seq` can grow; `seq`
        itself is the next victim once everything below it is gone. Returns whether it grew."""
        while not self._blocks.can_grow(seq.transfer_id, seq.num_context_tokens):
            if not victims:
                plan.stalled.append(seq)
                return False
            victim = victims.pop()
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        self._blocks.grow(seq.transfer_id, seq.num_context_tokens)
        return True

    def _preempt(self, seq: SeqT) -> None:
        assert not seq.in_step, f"{seq.transfer_id} is preempted while a step holds its blocks"
        num_blocks = self._blocks.free(seq.transfer_id)
        self.num_preemptions += 1
        self._metrics.count_preemption()
        logger.info(
            "preempted request %s (transfer %s%s) after %d generated tokens: %d blocks freed",
            seq.request_id, seq.transfer_id, ", its client not reading" * seq.reader_stalled,
            seq.num_generated, num_blocks,
        )


def num_reserved_slots(
    config: DecodeKVCacheConfig, num_prompt_tokens: int, max_new_tokens: int
) -> int:
    """Token slots a request gets when it arrives: its prompt plus the margin (`on_demand`) or
    plus every token it may generate (`full`)."""
    if config.reservation == "full":
        return num_prompt_tokens + max_new_tokens
    return num_prompt_tokens + min(config.reserve_new_tokens, max_new_tokens)


def check_cache_can_hold(
    blocks: BlockManager, num_prompt_tokens: int, num_slots: int, method: str
) -> None:
    """Raises InvalidArgument, naming the sizes, when `num_slots` slots for a prompt of
    `num_prompt_tokens` tokens exceed this replica's whole cache: such a request never fits
    here, whatever finishes (unlike RESOURCE_EXHAUSTED, which means "not now")."""
    num_blocks = blocks.blocks_needed(num_slots)
    if num_blocks > blocks.num_total_blocks:
        raise InvalidArgument(
            method, f"{num_prompt_tokens} prompt tokens need {num_slots} token slots "
            f"({num_blocks} blocks of {blocks.block_size}); this replica's whole KV cache has "
            f"{blocks.num_total_blocks} blocks",
        )


def _service_order(seq: Growable) -> tuple[bool, int, float, int]:
    return seq.service_order
