"""Injected faults on one transfer's chunk stream (tests and chaos runs; never by default).

Applied to the sender's outgoing messages after checksums are computed, so each fault looks to
the receiver exactly like the real thing on the wire: a flipped byte, a lost, a repeated or a
late chunk. The receiver must catch every one of them but the delay.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from kvtransfer.stream import Chunk, Message

FAULT_KINDS = ("corrupt", "drop", "duplicate", "delay")


@dataclass(frozen=True)
class ChunkFault:
    kind: str
    # Which chunk (its seq) the fault hits.
    seq: int = 0
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")

    def apply(self, messages: Iterator[Message]) -> Iterator[Message]:
        for message in messages:
            if not isinstance(message, Chunk) or message.spec.seq != self.seq:
                yield message
            elif self.kind == "corrupt":
                data = bytearray(message.data)
                data[len(data) // 2] ^= 0xFF
                yield Chunk(message.spec, message.crc32c, bytes(data), message.shm)
            elif self.kind == "duplicate":
                yield message
                yield message
            elif self.kind == "delay":
                time.sleep(self.delay_s)  # the injected lateness itself
                yield message
            # "drop": the chunk never leaves
