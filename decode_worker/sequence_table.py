"""The live requests of one replica, by transfer id, and the rule for freeing their blocks.

Shared by `DecodeWorker` and `ColocatedWorker`. The table frees a sequence's blocks once the
worker has released it (set its state to done) AND no step may read or write them (`in_step` is
false): one released during a step keeps its blocks until the batch loop calls `on_step_exit`
for it after that step. A preempted sequence is the one exception: it is in no step and never
runs again, so the growth pass frees its blocks at once (`decode_worker.kv_growth`) and the
table's later free finds nothing (`BlockManager.free` is idempotent). Event loop only.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Generic, TypeVar

from decode_worker.colocated_sequence import ColocatedSequence
from decode_worker.sequence import DecodeSequence
from engine.block_manager import BlockManager

SeqT = TypeVar("SeqT", DecodeSequence, ColocatedSequence)


class SequenceTable(Generic[SeqT]):
    def __init__(self, blocks: BlockManager, done: Enum) -> None:
        """`done` is the state in which a sequence's blocks may be freed."""
        self._blocks = blocks
        self._done = done
        self._by_transfer_id: dict[str, SeqT] = {}
        self.total_requests = 0

    def __len__(self) -> int:
        return len(self._by_transfer_id)

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._by_transfer_id

    def get(self, transfer_id: str) -> SeqT | None:
        return self._by_transfer_id.get(transfer_id)

    def values(self) -> Iterator[SeqT]:
        return iter(self._by_transfer_id.values())

    def mark_reader(self, transfer_id: str, stalled: bool) -> bool:
        """Marks (or unmarks) a sequence whose client is not reading its stream: the first
        preemption victim while marked (`service_order`). Returns whether it is known."""
        seq = self._by_transfer_id.get(transfer_id)
        if seq is None:
            return False
        seq.reader_stalled = stalled
        return True

    @property
    def num_stalled_readers(self) -> int:
        return sum(seq.reader_stalled for seq in self._by_transfer_id.values())

    def add(self, seq: SeqT) -> None:
        """Registers a sequence whose blocks the caller allocated; counts it as a request."""
        self._by_transfer_id[seq.transfer_id] = seq
        self.total_requests += 1

    def pop(self, transfer_id: str) -> SeqT | None:
        """Forgets a sequence without touching its blocks (the caller frees them)."""
        return self._by_transfer_id.pop(transfer_id, None)

    def release(self, seq: SeqT) -> None:
        """Forgets a sequence the caller set to done (idempotent) and frees its blocks unless a
        step holds them."""
        if self._by_transfer_id.get(seq.transfer_id) is seq:
            del self._by_transfer_id[seq.transfer_id]
        self.on_step_exit(seq)

    def on_step_exit(self, seq: SeqT) -> None:
        """Frees the blocks of a released sequence that no step holds. The batch loop calls it
        after the step in which `seq` left the batch."""
        if seq.state is self._done and not seq.in_step:
            self._blocks.free(seq.transfer_id)
