"""The paged KV cache: one tensor, addressed by slots.

Layout: `[2, num_layers, num_blocks * block_size, num_kv_heads, head_dim]` (keys, then values;
the blocks' slots flattened into one axis).
A slot is `block_id * block_size + offset`; a sequence's token `i` lives in slot
`block_table[i // block_size] * block_size + i % block_size`. One request's KV is therefore a
gather by its block table, and a scatter on the receiving side. The cache owns the tensor only;
which blocks belong to whom is the `BlockManager`'s business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int
    num_blocks: int

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @staticmethod
    def blocks_for_budget(memory_mb: int, bytes_per_block: int) -> int:
        return max(1, (memory_mb * 1024 * 1024) // bytes_per_block)


class GatherBuffers:
    """Reusable destination of `PagedKVCache.gather_layer`: a forward pass gathers each
    layer's contexts into the same two buffers instead of allocating fresh ones 30 times per
    step. Large fresh allocations are handed back to the OS on free and page-faulted in again
    on every use: at 32 contexts of 512 tokens that was ~180k page faults and over half the
    CPU time of a decode step. The buffers only grow: they hold one layer of the largest
    padded batch of contexts seen, about 1/num_layers of that batch's KV. Owned by one model
    runner; one forward at a time."""

    def __init__(self) -> None:
        self._keys = torch.empty(0)
        self._values = torch.empty(0)

    def take(self, num_rows: int, row_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """`[num_rows, row_size]` views of the two buffers, grown when too small (by half
        again: contexts grow a token per step)."""
        needed = num_rows * row_size
        if self._keys.dtype != dtype or needed > self._keys.numel():
            size = needed + needed // 2
            self._keys = torch.empty(size, dtype=dtype)
            self._values = torch.empty(size, dtype=dtype)
        return (
            self._keys[:needed].view(num_rows, row_size),
            self._values[:needed].view(num_rows, row_size),
        )


class PagedKVCache:
    """Owns the cache tensor; reads and writes K/V by slot."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.tensor = torch.zeros(
            2,
            spec.num_layers,
            spec.num_blocks * spec.block_size,
            spec.num_kv_heads,
            spec.head_dim,
            dtype=spec.dtype,
            device=device,
        )  # [2, layers, slots, heads, dim]: blocks flattened into slots
        # Each layer's keys and values as `[slots, heads, dim]` views, made once (a decode step
        # asks for every layer's).
        self._layer_views = [
            (self.tensor[0, layer], self.tensor[1, layer]) for layer in range(spec.num_layers)
        ]

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence with `block_table`."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def block_table_tensor(self, block_tables: Sequence[list[int]]) -> torch.Tensor:
        """`[len(block_tables), longest]` block ids, short tables padded with block 0. Callers
        check that every position they look up is covered by its own table."""
        longest = max((len(table) for table in block_tables), default=0)
        padded = [table + [0] * (longest - len(table)) for table in block_tables]
        return torch.tensor(padded, dtype=torch.long).view(len(block_tables), longest)

    def slots_at(
        self, tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Slots of token `positions` of the sequences whose tables are `tables[rows]` (any
        broadcastable shapes; vectorised form of `slots`)."""
        block_size = self.block_size
        return tables[rows, positions // block_size] * block_size + positions % block_size

    def write_layer(
        self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Stores keys/values `[tokens, heads, dim]` of one layer at `slots`."""
        self.tensor[0, layer].index_copy_(0, slots, keys.to(self.spec.dtype))
        self.tensor[1, layer].index_copy_(0, slots, values.to(self.spec.dtype))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer as `[slots, heads, dim]` views."""
        return self._layer_views[layer]

    def gather_layer(
        self, layer: int, slots: torch.Tensor, out: GatherBuffers | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values at `slots`: two contiguous `[n, heads, dim]` copies,
        written into `out`'s buffers when given (valid until its next use), else new tensors.

        One `index_select` of whole rows per half, on a 2-D `[slots, heads * dim]` view: that
        copies rows (~2x faster than selecting from the 3-D view in fp32), while selecting
        along the slot axis of the strided `[2, slots, ...]` view is ~100x slower."""
        spec = self.spec
        row_shape = (spec.num_kv_heads, spec.head_dim)
        keys_out = values_out = None
        if out is not None:
            keys_out, values_out = out.take(slots.numel(), row_shape[0] * row_shape[1], spec.dtype)
        keys = torch.index_select(self.tensor[0, layer].flatten(1), 0, slots, out=keys_out)
        values = torch.index_select(self.tensor[1, layer].flatten(1), 0, slots, out=values_out)
        return keys.view(-1, *row_shape), values.view(-1, *row_shape)

    def read(self, layer_start: int, layer_end: int, slots: torch.Tensor) -> torch.Tensor:
        """Gathers K/V of layers [layer_start, layer_end) at `slots`:
        a contiguous `[2, layers, tokens, heads, dim]` tensor."""
        return self.tensor[:, layer_start:layer_end].index_select(2, slots)

    def write(self, layer_start: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Scatters `kv` `[2, layers, tokens, heads, dim]` into layers starting at `layer_start`."""
        layer_end = layer_start + kv.shape[1]
        self.tensor[:, layer_start:layer_end].index_copy_(2, slots, kv)
