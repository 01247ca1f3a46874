"""How far a forward pass has got: senders of layer-pipelined KV wait on it.

The forward thread reports each layer whose KV is in the cache; a KV sender thread waits until
the layers of its next chunk are there. A failed pass wakes every waiter with the error.
"""

from __future__ import annotations

import threading


class LayerProgress:
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._num_written = 0
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def layer_written(self, layer: int) -> None:
        """Called by the forward thread once layer `layer`'s KV is in the cache."""
        with self._changed:
            self._num_written = max(self._num_written, layer + 1)
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def wait_for(self, num_layers: int) -> None:
        """Blocks until layers [0, num_layers) are written; raises the pass's error if it
        failed. Every pass ends (writes all layers or fails), so this never waits forever."""
        with self._changed:
            self._changed.wait_for(lambda: self._error or self._num_written >= num_layers)
            if self._num_written < num_layers and self._error is not None:
                raise self._error
