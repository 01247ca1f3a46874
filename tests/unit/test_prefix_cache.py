"""Prefix caching in the block manager: chained block hashes, the longest cached prefix,
reference counts on shared blocks, LRU eviction of unreferenced cached blocks only, and a
randomized run checked against a plain model in which no block in use is ever handed out; a
layer-pipelined KV source waits for the pass only for tokens the pass writes."""

from __future__ import annotations

import random

import pytest
import torch

from engine.block_manager import BlockManager
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.kv_io import PagedKVSource
from engine.layer_progress import LayerProgress
from engine.prefix_cache import HASH_BYTES, PrefixIndex, hash_blocks
from kvtransfer import ChunkSpec
from pdserve.errors import ResourceExhausted

BLOCK_SIZE = 4


def prompt(*blocks: int, tail: int = 0) -> list[int]:
    """Token ids: one full block per value in `blocks` (filled with it), then `tail` more."""
    tokens = [value for value in blocks for _ in range(BLOCK_SIZE)]
    return tokens + [7777] * tail


def admit(blocks: BlockManager, owner: str, tokens: list[int]) -> tuple[list[int], int]:
    """What the prefill batcher does: look up, allocate sharing the hits. Returns the table
    and the number of cached tokens."""
    cached = blocks.cached_prefix(len(tokens), hash_blocks(tokens, BLOCK_SIZE))
    return blocks.allocate(owner, len(tokens), cached), len(cached) * BLOCK_SIZE


def compute(blocks: BlockManager, owner: str, tokens: list[int]) -> None:
    """What the prefill worker does after a successful pass."""
    blocks.cache_blocks(owner, hash_blocks(tokens, BLOCK_SIZE))


def test_hashes_cover_full_blocks_only_and_chain_over_the_whole_prefix() -> None:
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    hashes = hash_blocks(tokens, BLOCK_SIZE)
    assert len(hashes) == 2 and all(len(h) == HASH_BYTES for h in hashes)
    assert hash_blocks(tokens, BLOCK_SIZE) == hashes, "deterministic"
    assert hash_blocks(tokens[:8], BLOCK_SIZE) == hashes
    # Same second block after a different first block: a different chain.
    other = hash_blocks([99, 1, 2, 3] + tokens[4:8], BLOCK_SIZE)
    assert other[0] != hashes[0] and other[1] != hashes[1]
    # The same tokens at another position hash differently too.
    assert hash_blocks(tokens[4:8], BLOCK_SIZE)[0] != hashes[1]
    assert hash_blocks([1, 2, 3], BLOCK_SIZE) == []


def test_hashes_distinguish_token_order_and_large_ids() -> None:
    assert hash_blocks([1, 2, 3, 4], 4) != hash_blocks([4, 3, 2, 1], 4)
    assert hash_blocks([2**40, 0, 0, 0], 4) != hash_blocks([0, 2**40, 0, 0], 4)
    with pytest.raises(ValueError):
        hash_blocks([2**64, 0, 0, 0], 4)
    with pytest.raises(ValueError):
        hash_blocks([1], 0)


def test_index_matches_the_longest_leading_run() -> None:
    index = PrefixIndex()
    a, b, c = (bytes([i]) * HASH_BYTES for i in range(3))
    assert index.add(a, 5) and index.add(c, 6)
    assert index.match([a, b, c]) == [5], "stops at the first miss"
    assert index.match([b, c]) == []
    assert not index.add(a, 9), "a hash is indexed once"
    assert not index.add(b, 5), "a block holds one prefix"
    assert index.num_cached_blocks == 2


def test_a_repeated_prefix_shares_blocks_and_leaves_the_last_token_to_compute() -> None:
    blocks = BlockManager(16, BLOCK_SIZE)
    first = prompt(1, 2, 3, tail=2)
    table_a, cached_a = admit(blocks, "a", first)
    assert cached_a == 0
    compute(blocks, "a", first)
    assert blocks.num_cached_blocks == 3, "the partial last block is not cached"
    # Same first two blocks, different third one and tail.
    second = prompt(1, 2, 9, tail=1)
    table_b, cached_b = admit(blocks, "b", second)
    assert cached_b == 2 * BLOCK_SIZE
    assert table_b[:2] == table_a[:2] and not set(table_b[2:]) & set(table_a)
    assert [blocks.ref_count(x) for x in table_a[:2]] == [2, 2]
    # A block-aligned repeat of the whole prompt: its last block is recomputed, not shared.
    aligned = prompt(1, 2, 3)
    table_c, cached_c = admit(blocks, "c", aligned)
    assert cached_c == 2 * BLOCK_SIZE and table_c[:2] == table_a[:2]
    assert table_c[2] != table_a[2]
    compute(blocks, "c", aligned)  # its duplicate of block 3 is not indexed twice
    assert blocks.num_cached_blocks == 3


def test_freed_cached_blocks_stay_cached_and_count_as_free() -> None:
    blocks = BlockManager(8, BLOCK_SIZE)
    tokens = prompt(1, 2, tail=3)
    table, _ = admit(blocks, "a", tokens)
    compute(blocks, "a", tokens)
    assert blocks.num_free_blocks == 5
    assert blocks.free("a") == 3
    assert blocks.num_free_blocks == 8 and blocks.num_owners == 0, "quiet means all free"
    assert blocks.num_cached_blocks == 2 and blocks.num_evictable_blocks == 2
    again, cached = admit(blocks, "b", tokens)
    assert cached == 2 * BLOCK_SIZE and again[:2] == table[:2]
    assert blocks.num_evictable_blocks == 0
    assert blocks.num_free_blocks == 5


def test_a_failed_pass_caches_nothing() -> None:
    blocks = BlockManager(8, BLOCK_SIZE)
    tokens = prompt(1, 2, tail=1)
    admit(blocks, "a", tokens)
    blocks.free("a")  # no cache_blocks: the pass failed
    assert blocks.num_cached_blocks == 0 and blocks.num_free_blocks == 8
    assert admit(blocks, "b", tokens)[1] == 0


def test_eviction_takes_least_recently_used_unreferenced_blocks_tails_first() -> None:
    blocks = BlockManager(6, BLOCK_SIZE)
    old, new = prompt(1, 2), prompt(3, 4)
    table_old, _ = admit(blocks, "old", old)
    compute(blocks, "old", old)
    table_new, _ = admit(blocks, "new", new)
    compute(blocks, "new", new)
    blocks.free("old")
    blocks.free("new")
    # 2 never-used blocks, then one eviction: the old prompt's tail goes first.
    blocks.allocate("x", 3 * BLOCK_SIZE)
    assert blocks.num_cached_blocks == 3
    assert blocks.cached_prefix(9, hash_blocks(old, BLOCK_SIZE)) == table_old[:1]
    assert blocks.cached_prefix(9, hash_blocks(new, BLOCK_SIZE)) == table_new


def test_a_hit_refreshes_recency() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    first, second = prompt(1, tail=1), prompt(2, tail=1)
    for owner, tokens in (("a", first), ("b", second)):
        admit(blocks, owner, tokens)
        compute(blocks, owner, tokens)
        blocks.free(owner)
    table, cached = admit(blocks, "c", first)  # touches the older entry
    assert cached == BLOCK_SIZE
    blocks.free("c")
    blocks.allocate("x", 3 * BLOCK_SIZE)  # the free tail block + 1 never used + 1 eviction
    assert blocks.cached_prefix(5, hash_blocks(first, BLOCK_SIZE)) == table[:1]
    assert blocks.cached_prefix(5, hash_blocks(second, BLOCK_SIZE)) == []


def test_referenced_cached_blocks_are_never_evicted() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    tokens = prompt(1, 2, tail=1)
    table, _ = admit(blocks, "a", tokens)
    compute(blocks, "a", tokens)
    assert not blocks.can_allocate(2 * BLOCK_SIZE)
    with pytest.raises(ResourceExhausted):
        blocks.allocate("x", 2 * BLOCK_SIZE)
    # A sharer holds the prefix after the first owner is gone: still not evictable.
    shared, _ = admit(blocks, "b", tokens)
    blocks.free("a")
    assert blocks.num_free_blocks == 1  # a's private last block
    with pytest.raises(ResourceExhausted):
        blocks.allocate("x", 2 * BLOCK_SIZE)
    other = blocks.allocate("x", BLOCK_SIZE)
    assert not set(other) & set(shared)
    assert blocks.cached_prefix(9, hash_blocks(tokens, BLOCK_SIZE)) == table[:2]


def test_evictable_hits_count_against_the_space_they_free() -> None:
    blocks = BlockManager(3, BLOCK_SIZE)
    tokens = prompt(1, 2, tail=1)
    admit(blocks, "a", tokens)
    compute(blocks, "a", tokens)
    blocks.free("a")
    assert blocks.num_free_blocks == 3
    # 5 blocks' worth would need 3 fresh blocks besides the 2 hits: only 1 is left.
    longer = prompt(1, 2, 5, 6, tail=1)
    cached = blocks.cached_prefix(len(longer), hash_blocks(longer, BLOCK_SIZE))
    assert len(cached) == 2
    assert not blocks.can_allocate(len(longer), cached)
    with pytest.raises(ResourceExhausted):
        blocks.allocate("b", len(longer), cached)
    assert blocks.num_evictable_blocks == 2 and not blocks.owns("b"), "nothing changed"
    assert blocks.can_allocate(len(tokens), cached)
    assert blocks.allocate("b", len(tokens), cached)[:2] == cached


def test_stale_or_bogus_cached_blocks_are_refused() -> None:
    blocks = BlockManager(4, BLOCK_SIZE)
    tokens = prompt(1, tail=1)
    admit(blocks, "a", tokens)
    compute(blocks, "a", tokens)
    blocks.free("a")
    cached = blocks.cached_prefix(len(tokens), hash_blocks(tokens, BLOCK_SIZE))
    blocks.allocate("x", 4 * BLOCK_SIZE)  # evicts it
    blocks.free("x")
    with pytest.raises(ValueError, match="not cached"):
        blocks.allocate("b", len(tokens), cached)
    with pytest.raises(ValueError):
        blocks.allocate("b", 1, [0, 1])


def test_randomized_prompts_never_share_a_block_in_use() -> None:
    """Owners come and go with prompts drawn from a few shared prefixes. After every step:
    each block's ref count equals the number of live tables holding it; a fresh block is
    referenced by its new owner alone; every shared block's content (the prompt prefix it was
    computed for) matches the new owner's prompt up to that block; free + referenced blocks
    add up."""
    num_blocks = 20
    blocks = BlockManager(num_blocks, BLOCK_SIZE)
    rng = random.Random(99)
    prefixes = [[rng.randrange(1000) for _ in range(BLOCK_SIZE * n)] for n in (1, 3, 6)]
    content: dict[int, list[int]] = {}  # block -> the tokens its KV was computed from
    live: dict[str, list[int]] = {}
    num_hits = num_refused = num_evictions = 0
    for step in range(3000):
        owner = f"o{rng.randrange(24)}"
        num_cached_before = blocks.num_cached_blocks
        if owner in live:
            blocks.free(owner)
            del live[owner]
        elif rng.random() < 0.7:
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(9))]
            if not tokens:
                continue
            try:
                table, num_cached = admit(blocks, owner, tokens)
            except ResourceExhausted:
                num_refused += 1
                continue
            num_hits += num_cached > 0
            for index, block in enumerate(table[: num_cached // BLOCK_SIZE]):
                start = index * BLOCK_SIZE
                assert content[block] == tokens[: start + BLOCK_SIZE], f"step {step}"
            for index, block in enumerate(table[num_cached // BLOCK_SIZE :]):
                start = num_cached + index * BLOCK_SIZE
                assert blocks.ref_count(block) == 1, f"step {step}: a fresh block is shared"
                content[block] = tokens[: start + BLOCK_SIZE]  # the pass writes it
            live[owner] = tokens
            if rng.random() < 0.9:  # else the pass failed
                compute(blocks, owner, tokens)
        num_evictions += blocks.num_cached_blocks < num_cached_before
        check_invariants(blocks, live, num_blocks, step)
    assert num_hits > 100 and num_refused > 10 and num_evictions > 10, "an honest workout"
    for owner in list(live):
        blocks.free(owner)
    assert blocks.num_free_blocks == num_blocks and blocks.num_owners == 0


def check_invariants(
    blocks: BlockManager, live: dict[str, list[int]], num_blocks: int, step: int
) -> None:
    holders: dict[int, int] = {}
    for owner in live:
        for block in blocks.block_table(owner):
            holders[block] = holders.get(block, 0) + 1
    for block in range(num_blocks):
        assert blocks.ref_count(block) == holders.get(block, 0), f"step {step} block {block}"
    assert blocks.num_free_blocks == num_blocks - len(holders), f"step {step}"
    assert blocks.num_owners == len(live)


def test_a_pipelined_source_waits_only_for_tokens_the_pass_writes() -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                       block_size=BLOCK_SIZE, num_blocks=4)
    cache = PagedKVCache(spec)
    cache.tensor.copy_(torch.arange(cache.tensor.numel(), dtype=torch.float32).view_as(
        cache.tensor))
    progress = LayerProgress(num_layers=2)
    # A pass that fails before writing any layer: whoever waits for it gets its error.
    progress.fail(RuntimeError("pass failed"))
    source = PagedKVSource(cache, [3, 1, 2], 10, progress, num_ready_tokens=2 * BLOCK_SIZE)
    cached_part = source.read(ChunkSpec(0, 0, 2, 0, 2 * BLOCK_SIZE))
    expected = cache.read(0, 2, cache.slots([3, 1, 2], 0, 2 * BLOCK_SIZE)).contiguous()
    assert bytes(cached_part) == expected.numpy().tobytes()
    with pytest.raises(RuntimeError, match="pass failed"):
        source.read(ChunkSpec(1, 0, 2, 2 * BLOCK_SIZE - 1, 10))
