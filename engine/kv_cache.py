"""The paged KV cache: one tensor, addressed by slots.

Layout: `[2, num_layers, num_blocks * block_size, num_kv_heads, head_dim]` (keys, then values;
the blocks' slots flattened into one axis).
A slot is `block_id * block_size + offset`; a sequence's token `i` lives in slot
`block_table[i // block_size] * block_size + i % block_size`. One request's KV is therefore a
gather by its block table, and a scatter on the receiving side. The cache owns the tensor only;
which blocks belong to whom is the `BlockManager`'s business.
"""

from __future__ import annotations

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

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence with `block_table`."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def write_layer(
        self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Stores keys/values `[tokens, heads, dim]` of one layer at `slots`."""
        self.tensor[0, layer].index_copy_(0, slots, keys.to(self.spec.dtype))
        self.tensor[1, layer].index_copy_(0, slots, values.to(self.spec.dtype))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer as `[slots, heads, dim]` views."""
        return self.tensor[0, layer], self.tensor[1, layer]

    def read(self, layer_start: int, layer_end: int, slots: torch.Tensor) -> torch.Tensor:
        """Gathers K/V of layers [layer_start, layer_end) at `slots`:
        a contiguous `[2, layers, tokens, heads, dim]` tensor."""
        return self.tensor[:, layer_start:layer_end].index_select(2, slots)

    def write(self, layer_start: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Scatters `kv` `[2, layers, tokens, heads, dim]` into layers starting at `layer_start`."""
        layer_end = layer_start + kv.shape[1]
        self.tensor[:, layer_start:layer_end].index_copy_(2, slots, kv)
