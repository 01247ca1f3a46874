"""Stop-string matching over a stream of text deltas.

A stop string can arrive split over several tokens, so the matcher holds back the longest tail
of the text seen so far that could still grow into a stop string, and emits the rest. When a
stop string completes, the text before it is emitted and the stop string itself never is.

Which stop string wins does not depend on how the text was cut into deltas: it is the
occurrence that ends first (the one generation would have completed first), and among those
the one that starts first (the longest).
"""

from __future__ import annotations


class StopStringMatcher:
    """Filters one request's text deltas for stop strings.

    Owned by the router task that streams the request; pure Python, never blocks or raises.
    After a hit the matcher is finished: further `feed` calls are no-ops returning ("", True)
    (tokens already in flight from the decode replica may still arrive), and `flush` returns "".
    """

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        # Every proper prefix of a stop string: a tail equal to one of these is held back.
        self._prefixes = {s[:i] for s in self._stop for i in range(1, len(s))}
        self._max_held_chars = max((len(s) - 1 for s in self._stop), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        if not self._stop:
            return delta, False
        text = self._held + delta
        start = self._first_match(text)
        if start is not None:
            self._stopped = True
            self._held = ""
            return text[:start], True
        num_held = self._num_held_chars(text)
        self._held = text[len(text) - num_held :]
        return text[: len(text) - num_held], False

    def flush(self) -> str:
        """Returns the held-back tail when generation ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> int | None:
        best: tuple[int, int] | None = None  # (end, start) of the winning occurrence
        for stop in self._stop:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else best[1]

    def _num_held_chars(self, text: str) -> int:
        for num_chars in range(min(self._max_held_chars, len(text)), 0, -1):
            if text[len(text) - num_chars :] in self._prefixes:
                return num_chars
        return 0
