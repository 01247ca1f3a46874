"""BlockManager accounting: allocate/grow/free, refusals that change nothing, and a randomized
sequence of operations checked against a plain model of who owns what."""

from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from pdserve.errors import ResourceExhausted, StatusCode


def snapshot(blocks: BlockManager) -> tuple[int, int, dict[str, list[int]]]:
    owners = {f"o{i}" for i in range(64)} | {"a", "b", "c", "big"}
    tables = {owner: list(blocks.block_table(owner)) for owner in owners if blocks.owns(owner)}
    return blocks.num_free_blocks, blocks.num_owners, tables


def test_rejects_empty_geometry() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


@pytest.mark.parametrize(
    ("block_size", "num_tokens", "expected"),
    [
        (16, 0, 0),
        (16, 1, 1),
        (16, 15, 1),
        (16, 16, 1),
        (16, 17, 2),
        (16, 32, 2),
        (16, 33, 3),
        (1, 7, 7),
        (5, 24, 5),
        (5, 25, 5),
        (5, 26, 6),
    ],
)
def test_blocks_needed_rounds_up(block_size: int, num_tokens: int, expected: int) -> None:
    assert BlockManager(8, block_size).blocks_needed(num_tokens) == expected


def test_allocate_gives_enough_disjoint_blocks_and_free_returns_them() -> None:
    blocks = BlockManager(10, 4)
    table_a = blocks.allocate("a", 9)  # 3 blocks
    table_b = blocks.allocate("b", 4)  # 1 block
    table_c = blocks.allocate("c", 13)  # 4 blocks
    assert (len(table_a), len(table_b), len(table_c)) == (3, 1, 4)
    every = table_a + table_b + table_c
    assert len(set(every)) == len(every), "a block was handed to two owners"
    assert all(0 <= block < 10 for block in every)
    assert blocks.num_free_blocks == 2
    assert blocks.num_owners == 3
    assert blocks.block_table("c") == table_c
    assert blocks.owns("a") and not blocks.owns("d")

    assert blocks.free("b") == 1
    assert blocks.free("a") == 3
    assert blocks.free("c") == 4
    assert blocks.num_free_blocks == 10
    assert blocks.num_owners == 0


def test_freed_blocks_are_reused() -> None:
    blocks = BlockManager(4, 2)
    first = blocks.allocate("a", 8)
    blocks.free("a")
    second = blocks.allocate("b", 8)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3]


def test_free_is_idempotent_and_ignores_unknown_owners() -> None:
    blocks = BlockManager(6, 4)
    blocks.allocate("a", 10)
    blocks.allocate("b", 4)
    assert blocks.free("a") == 3
    assert blocks.free("a") == 0
    assert blocks.free("never") == 0
    assert blocks.num_free_blocks == 5
    assert blocks.num_owners == 1
    assert blocks.owns("b")


def test_allocate_beyond_capacity_raises_and_changes_nothing() -> None:
    blocks = BlockManager(5, 4)
    blocks.allocate("a", 12)
    before = snapshot(blocks)
    assert not blocks.can_allocate(9)
    with pytest.raises(ResourceExhausted) as info:
        blocks.allocate("big", 9)  # 3 blocks, 2 free
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert snapshot(blocks) == before
    assert not blocks.owns("big")
    # Exactly the free capacity still fits afterwards.
    assert blocks.can_allocate(8)
    assert len(blocks.allocate("big", 8)) == 2
    assert blocks.num_free_blocks == 0


def test_duplicate_owner_raises_value_error_and_changes_nothing() -> None:
    blocks = BlockManager(8, 4)
    table = list(blocks.allocate("a", 5))
    before = snapshot(blocks)
    with pytest.raises(ValueError):
        blocks.allocate("a", 1)
    assert snapshot(blocks) == before
    assert blocks.block_table("a") == table


def test_grow_appends_fresh_blocks_to_the_same_table() -> None:
    blocks = BlockManager(6, 4)
    table = blocks.allocate("a", 5)  # 2 blocks
    other = blocks.allocate("b", 4)
    assert blocks.num_blocks_to_grow("a", 8) == 0
    assert blocks.grow("a", 8) == 0, "the table already covers 8 slots"
    assert blocks.can_grow("a", 9)
    assert blocks.grow("a", 9) == 1
    assert blocks.grow("a", 16) == 1
    assert blocks.block_table("a") is table, "holders of the table must see the new blocks"
    assert len(table) == 4 and len(set(table + other)) == 5
    assert blocks.num_free_blocks == 1


def test_grow_beyond_capacity_raises_and_changes_nothing() -> None:
    blocks = BlockManager(5, 4)
    table = blocks.allocate("a", 4)
    blocks.allocate("b", 12)
    before = snapshot(blocks)
    assert blocks.num_blocks_to_grow("a", 13) == 3
    assert not blocks.can_grow("a", 13)  # 3 more blocks, 1 free
    with pytest.raises(ResourceExhausted) as info:
        blocks.grow("a", 13)
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert "3 more blocks" in str(info.value)
    assert snapshot(blocks) == before and len(table) == 1
    assert blocks.grow("a", 8) == 1, "exactly the free capacity still fits"
    assert blocks.num_free_blocks == 0


def test_grow_of_an_owner_without_blocks_raises_value_error() -> None:
    blocks = BlockManager(4, 4)
    with pytest.raises(ValueError, match="holds no blocks"):
        blocks.grow("nobody", 4)
    with pytest.raises(ValueError):
        blocks.can_grow("nobody", 4)
    assert blocks.num_free_blocks == 4 and blocks.num_owners == 0


def test_free_returns_the_grown_table() -> None:
    blocks = BlockManager(8, 2)
    blocks.allocate("a", 2)
    for num_tokens in range(3, 13):
        blocks.grow("a", num_tokens)
    assert len(blocks.block_table("a")) == 6
    assert blocks.free("a") == 6
    assert blocks.num_free_blocks == 8 and blocks.num_owners == 0
    assert sorted(blocks.allocate("b", 16)) == list(range(8)), "every grown block came back"


def test_randomized_operations_match_a_simple_model() -> None:
    num_blocks, block_size = 48, 4
    blocks = BlockManager(num_blocks, block_size)
    model: dict[str, list[int]] = {}
    rng = random.Random(1234)
    for step in range(3000):
        owner = f"o{rng.randrange(64)}"
        roll = rng.random()
        if roll < 0.2 and owner in model:
            num_tokens = rng.randrange(0, 4 * block_size * 8)
            missing = max(0, -(-num_tokens // block_size) - len(model[owner]))
            num_free = num_blocks - sum(len(t) for t in model.values())
            if missing > num_free:
                with pytest.raises(ResourceExhausted):
                    blocks.grow(owner, num_tokens)
            else:
                assert blocks.grow(owner, num_tokens) == missing, f"step {step}"
                model[owner] = list(blocks.block_table(owner))
        elif roll < 0.6:
            num_tokens = rng.randrange(0, 4 * block_size * 6)
            needed = -(-num_tokens // block_size)
            num_free = num_blocks - sum(len(t) for t in model.values())
            if owner in model:
                with pytest.raises(ValueError):
                    blocks.allocate(owner, num_tokens)
            elif needed > num_free:
                with pytest.raises(ResourceExhausted):
                    blocks.allocate(owner, num_tokens)
            else:
                table = blocks.allocate(owner, num_tokens)
                assert len(table) == needed, f"step {step}"
                model[owner] = list(table)
        else:
            freed = blocks.free(owner)
            assert freed == len(model.pop(owner, [])), f"step {step}"

        owned = [block for table in model.values() for block in table]
        assert len(owned) == len(set(owned)), f"step {step}: a block is owned twice"
        assert all(0 <= block < num_blocks for block in owned)
        assert blocks.num_free_blocks == num_blocks - len(owned), f"step {step}"
        assert blocks.num_owners == len(model)
        for name, table in model.items():
            assert blocks.block_table(name) == table

    for name in list(model):
        blocks.free(name)
    assert blocks.num_free_blocks == num_blocks
    assert blocks.num_owners == 0
