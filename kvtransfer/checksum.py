"""The chunk checksum: CRC32C (Castagnoli), hardware-accelerated by the `crc32c` package."""

from __future__ import annotations

import crc32c


def checksum(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of `data` as an unsigned 32-bit int. `data` must be C-contiguous."""
    return int(crc32c.crc32c(data))
