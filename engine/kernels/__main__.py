"""`python -m engine.kernels`: builds the native kernels now (instead of on a replica's first
start) and prints what would serve each dtype on this machine. Exits 0 either way: a machine
without them serves on torch's kernels (see `engine.kernels.native`)."""

from __future__ import annotations

import logging

from engine.kernels.native import REQUIRED_FEATURES, kernel_status


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for dtype in REQUIRED_FEATURES:
        print(f"{dtype}: {kernel_status('auto', dtype).describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
