"""The progress bar of a running benchmark, on stderr (tqdm)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from pdserve.bench.records import RequestRecord
from pdserve.bench.workload import MAIN


class ProgressBar:
    """Counts finished main requests against `total` (None: unknown, the duration bounds the
    run) and shows failures and long prompts beside it. `update` is called on the runner's
    event loop; `close` once at the end. Disabled, it prints nothing."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self._bar = tqdm(
            total=total,
            unit="req",
            desc="bench",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
        )
        self._num_failed = 0
        self._num_long = 0

    def update(self, record: RequestRecord) -> None:
        if not record.ok:
            self._num_failed += 1
        if record.kind == MAIN:
            self._bar.update(1)
        else:
            self._num_long += 1
        postfix = {"failed": self._num_failed}
        if self._num_long:
            postfix["long"] = self._num_long
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()
