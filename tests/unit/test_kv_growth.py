"""KVGrowth alone, on a real BlockManager and plain sequences: who grows, who is preempted
(stalled readers, then lowest priority, then newest; never the one served first), who sits a
step out, and the reservation sizes and refusals shared by both workers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from decode_worker.kv_growth import KVGrowth, check_cache_can_hold, num_reserved_slots
from engine.block_manager import BlockManager
from pdserve.config import DecodeKVCacheConfig
from pdserve.errors import InvalidArgument
from pdserve.metrics import ReplicaMetrics

BLOCK_SIZE = 4


@dataclass
class Seq:
    transfer_id: str
    num_context_tokens: int
    priority: int = 0
    admitted_at: float = 0.0
    arrival_index: int = 0
    in_step: bool = False
    reader_stalled: bool = False

    @property
    def request_id(self) -> str:
        return f"r-{self.transfer_id}"

    @property
    def num_generated(self) -> int:
        return 1

    @property
    def service_order(self) -> tuple[bool, int, float, int]:
        return (self.reader_stalled, self.priority, self.admitted_at, self.arrival_index)


def running(blocks: BlockManager, *specs: tuple[str, int, int]) -> list[Seq]:
    """Sequences admitted in this order, each holding `num_slots` slots and needing a slot
    for `num_context_tokens` tokens at the next step: (name, num_slots, num_context_tokens)."""
    seqs = []
    for index, (name, num_slots, num_context_tokens) in enumerate(specs):
        blocks.allocate(name, num_slots)
        seqs.append(Seq(name, num_context_tokens, admitted_at=float(index), arrival_index=index))
    return seqs


def names(seqs: list[Seq]) -> list[str]:
    return [seq.transfer_id for seq in seqs]


def test_a_sequence_gains_a_block_only_when_its_next_token_needs_one() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    (a,) = running(blocks, ("a", 8, 8))
    table = blocks.block_table("a")
    plan = growth.plan([a], [a])
    assert names(plan.ready) == ["a"] and len(table) == 2, "position 7 is in block 2"
    a.num_context_tokens = 9
    plan = growth.plan([a], [a])
    assert names(plan.ready) == ["a"] and len(table) == 3
    assert (plan.preempted, plan.stalled, plan.too_long) == ([], [], [])
    assert growth.num_preemptions == 0


def test_a_stalled_reader_is_preempted_before_newer_sequences() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b, c = running(blocks, ("a", 4, 5), ("b", 4, 5), ("c", 4, 5))  # 1 block free
    b.reader_stalled = True
    plan = growth.plan([a, b, c], [a, b, c])
    assert names(plan.preempted) == ["b"], "the newest, c, would be the victim otherwise"
    assert names(plan.ready) == ["a", "c"]


def test_a_stalled_reader_served_first_by_age_is_no_longer_spared() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b = running(blocks, ("a", 4, 5), ("b", 4, 5))  # 1 block free
    a.reader_stalled = True
    b.num_context_tokens = 9  # b needs 2 more blocks: only freeing a makes room
    plan = growth.plan([a, b], [a, b])
    assert names(plan.preempted) == ["a"], "the oldest is a victim once its reader stalls"
    assert names(plan.ready) == ["b"]


def test_the_newest_is_preempted_so_older_ones_grow() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b, c = running(blocks, ("a", 4, 5), ("b", 4, 5), ("c", 4, 5))  # 1 block free
    plan = growth.plan([c, a, b], [a, b, c])
    assert names(plan.ready) == ["a", "b"], "batch order kept"
    assert names(plan.preempted) == ["c"]
    assert not blocks.owns("c"), "a victim's blocks are freed at once"
    assert len(blocks.block_table("a")) == len(blocks.block_table("b")) == 2
    assert growth.num_preemptions == 1 and blocks.num_free_blocks == 0


def test_priority_beats_recency() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b, c = running(blocks, ("a", 4, 5), ("b", 4, 5), ("c", 4, 5))
    a.priority = 1  # admitted first, but less important than the two others
    plan = growth.plan([a, b, c], [a, b, c])
    assert names(plan.preempted) == ["a"]
    assert names(plan.ready) == ["b", "c"]


def test_ties_go_to_the_earlier_arrival_on_the_replica() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b = running(blocks, ("a", 4, 5), ("b", 4, 5))
    a.admitted_at = b.admitted_at = 7.0
    plan = growth.plan([b, a], [a, b])
    assert names(plan.ready) == ["a"] and names(plan.preempted) == ["b"]


def test_a_newer_sequence_preempts_itself_rather_than_an_older_one() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b = running(blocks, ("a", 8, 8), ("b", 4, 5))  # a fits; b needs the missing block
    plan = growth.plan([a, b], [a, b])
    assert names(plan.ready) == ["a"] and names(plan.preempted) == ["b"]
    assert blocks.num_free_blocks == 1 and len(blocks.block_table("a")) == 2


def test_the_oldest_is_never_preempted_it_sits_out_allocating_nothing() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    (a,) = running(blocks, ("a", 8, 9))
    blocks.allocate("reservation", 4)  # a request still waiting for its KV: never a victim
    plan = growth.plan([a], [a])
    assert names(plan.stalled) == ["a"] and plan.ready == [] and plan.preempted == []
    assert len(blocks.block_table("a")) == 2 and blocks.owns("reservation")
    blocks.free("reservation")
    plan = growth.plan([a], [a])
    assert names(plan.ready) == ["a"] and len(blocks.block_table("a")) == 3


def test_running_sequences_outside_the_batch_are_victims_too() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b, c = running(blocks, ("a", 4, 5), ("b", 4, 4), ("c", 4, 4))
    plan = growth.plan([a], [a, b, c])  # max_batch_size 1
    assert names(plan.ready) == ["a"] and names(plan.preempted) == ["c"]


def test_a_sequence_beyond_the_whole_cache_is_too_long_not_a_preemption() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    growth = KVGrowth[Seq](blocks, ReplicaMetrics("", "decode"))
    a, b = running(blocks, ("a", 4, 4), ("b", 8, 13))
    plan = growth.plan([a, b], [a, b])
    assert names(plan.too_long) == ["b"] and names(plan.ready) == ["a"]
    assert plan.preempted == [] and growth.num_preemptions == 0
    assert "13 tokens" in growth.too_long_error(b).message


@pytest.mark.parametrize(
    ("reservation", "margin", "max_new_tokens", "expected"),
    [("on_demand", 16, 500, 36), ("on_demand", 16, 3, 23), ("on_demand", 0, 9, 20),
     ("full", 16, 500, 520)],
)
def test_reserved_slots(reservation: str, margin: int, max_new_tokens: int, expected: int) -> None:
    config = DecodeKVCacheConfig.model_validate(
        {"reservation": reservation, "reserve_new_tokens": margin}
    )
    assert num_reserved_slots(config, 20, max_new_tokens) == expected


def test_a_reservation_beyond_the_whole_cache_names_the_sizes() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    blocks.allocate("busy", 16)  # a full cache now does not matter: only its size does
    check_cache_can_hold(blocks, 10, 16, "reserve")
    with pytest.raises(InvalidArgument) as info:
        check_cache_can_hold(blocks, 10, 17, "reserve")
    assert info.value.message == (
        "reserve: 10 prompt tokens need 17 token slots (5 blocks of 4); this replica's whole "
        "KV cache has 4 blocks"
    )
