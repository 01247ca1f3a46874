"""The one place the router handles Ray: calling replica actors and mapping Ray's errors.

Replica methods take and return msgpack bytes; this module awaits them with a timeout and turns
Ray's failures into pdserve errors: a dead actor is UNAVAILABLE, a timeout DEADLINE_EXCEEDED,
an exception inside the actor INTERNAL.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from pdserve.errors import DeadlineExceeded, Internal, PdserveError, Unavailable
from pdserve.futures import wait_within
from pdserve.messages import decode

T = TypeVar("T")


def to_pdserve_error(exc: BaseException, what: str) -> PdserveError:
    if isinstance(exc, PdserveError):
        return exc
    if isinstance(exc, RayActorError):
        return Unavailable(f"{what}: replica died ({type(exc).__name__})")
    if isinstance(exc, (GetTimeoutError, asyncio.TimeoutError)):
        return DeadlineExceeded(f"{what}: no answer in time")
    if isinstance(exc, RayTaskError):
        return Internal(f"{what}: replica error: {exc.cause!r}")
    if isinstance(exc, RayError):
        return Unavailable(f"{what}: {type(exc).__name__}")
    return Internal(f"{what}: {exc!r}")


async def call(method: Any, *args: Any, timeout_s: float, what: str) -> Any:
    """Awaits `method.remote(*args)`; raises a PdserveError on any failure."""
    try:
        return await wait_within(method.remote(*args), timeout_s)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a typed error
        raise to_pdserve_error(exc, what) from None


async def call_message(
    method: Any, reply_type: type[T], *args: Any, timeout_s: float, what: str
) -> T:
    """Like `call`, and decodes the msgpack reply into `reply_type`."""
    return decode(reply_type, await call(method, *args, timeout_s=timeout_s, what=what))


class EventStream:
    """A replica's streaming method as an async iterator of decoded events.

    `close()` cancels the Ray task (idempotent); the replica's generator then runs its cleanup.
    """

    def __init__(self, method: Any, event_type: type[T], request: bytes, what: str) -> None:
        self._refs = method.options(num_returns="streaming").remote(request)
        self._event_type = event_type
        self._what = what
        self._closed = False
        # The read in progress: a timeout leaves it running for the next call, so waiting in
        # slices never cancels (and never loses) an item of the stream.
        self._pending: asyncio.Task[Any] | None = None

    async def next(self, timeout_s: float) -> Any:
        """The next event, or raises (DEADLINE_EXCEEDED on timeout, UNAVAILABLE at end)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            raise DeadlineExceeded(f"{self._what}: no event within {timeout_s:.1f} s")
        task, self._pending = self._pending, None
        return task.result()

    async def _read(self) -> Any:
        try:
            ref = await self._refs.__anext__()
            return decode(self._event_type, await ref)
        except StopAsyncIteration:
            raise Unavailable(f"{self._what}: stream ended early") from None
        except (asyncio.CancelledError, PdserveError):
            raise
        except BaseException as exc:  # noqa: BLE001
            raise to_pdserve_error(exc, self._what) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pending is not None:
                self._pending.cancel()
            ray.cancel(self._refs)
