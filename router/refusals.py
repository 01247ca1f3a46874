"""Why no replica of one placement round took a request.

An attempt asks the replicas of a pool one after another (decode: to reserve blocks; colocated:
to admit the request) and collects their refusals here. The round's verdict:

- some replica had no room *now* (RESOURCE_EXHAUSTED): `ResourceExhausted`, and the caller
  waits in the router queue (`router.wait_queue`) to try again;
- else some replica could not be asked (UNAVAILABLE): the last such error;
- else every replica said the request can never fit its cache (INVALID_ARGUMENT):
  `InvalidArgument` on `prompt`. One replica saying so is not enough: another (a bigger
  cache) may take it.

Any other refusal (FAILED_PRECONDITION, DEADLINE_EXCEEDED, ...) is raised at once.
"""

from __future__ import annotations

from pdserve.errors import (
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
    StatusCode,
    Unavailable,
)

# The refusals a round collects; any other code ends the round at once.
_COLLECTED = (
    StatusCode.RESOURCE_EXHAUSTED, StatusCode.UNAVAILABLE, StatusCode.INVALID_ARGUMENT
)


class Refusals:
    """The refusals of one round over the pool `role`. Not shared between rounds."""

    def __init__(self, role: str) -> None:
        self._role = role
        self._no_room: ResourceExhausted | None = None
        self._unavailable: PdserveError | None = None
        self._never_fits: InvalidArgument | None = None

    def add(self, error: PdserveError) -> None:
        """Records one replica's refusal; raises `error` itself when it is not one a round
        collects."""
        if error.code not in _COLLECTED:
            raise error
        if error.code is StatusCode.RESOURCE_EXHAUSTED:
            self._no_room = ResourceExhausted(error.message)
        elif error.code is StatusCode.UNAVAILABLE:
            self._unavailable = error
        elif self._never_fits is None:
            self._never_fits = InvalidArgument(
                "prompt", f"no {self._role} replica can ever hold this request ({error.message})"
            )

    def verdict(self, wanted: str) -> PdserveError:
        """The error to raise after every replica refused; `wanted` says what was asked for
        ("room for 9 prompt + 16 new tokens")."""
        if self._no_room is not None:
            return ResourceExhausted(
                f"no {self._role} replica has {wanted} now ({self._no_room.message})"
            )
        if self._unavailable is not None:
            return self._unavailable
        if self._never_fits is not None:
            return self._never_fits
        return Unavailable(f"no live {self._role} replica")
