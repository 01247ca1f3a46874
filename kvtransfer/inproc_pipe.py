"""The in-process transport's stand-in for a network stream: a bounded pipe from one sender
thread to one receiver thread, and the push's outcome as the sender sees it."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

from kvtransfer.errors import TransferError
from kvtransfer.stream import Message

# Messages in flight between one sender and its receiver thread.
_PIPE_CAPACITY = 2


class Pipe:
    """A bounded queue from one sender thread to one receiver thread; either side may close it
    with an error, which the reader raises and which makes further puts fail."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[Message] = deque()
        self._ended = False
        self.error: TransferError | None = None

    def put(self, message: Message, timeout: float) -> bool:
        """False when not enqueued within `timeout` or the pipe is closed."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.error is not None or len(self._items) < _PIPE_CAPACITY, timeout
            )
            if self.error is not None or len(self._items) >= _PIPE_CAPACITY:
                return False
            self._items.append(message)
            self._cond.notify_all()
            return True

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def close(self, error: TransferError) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def __iter__(self) -> Iterator[Message]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.error is not None or self._items or self._ended)
                if self.error is not None:
                    raise self.error
                if not self._items:
                    return
                message = self._items.popleft()
                self._cond.notify_all()
            yield message


class PushCall:
    """The outcome of one push as the sender sees it: payload bytes or an error."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.num_bytes = 0
        self.error: TransferError | None = None

    def finish(self, num_bytes: int, error: TransferError | None) -> None:
        self.num_bytes, self.error = num_bytes, error
        self.done.set()
