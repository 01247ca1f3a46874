"""A failed future nobody awaits any more logs nothing; a waiter still gets the error."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from pdserve.errors import Cancelled
from pdserve.futures import fail_future


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_an_abandoned_failed_future_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    loop = asyncio.get_running_loop()
    # The oracle: asyncio does log a plain set_exception nobody retrieved.
    plain = loop.create_future()
    plain.set_exception(Cancelled("plain"))
    del plain
    gc.collect()
    assert len(never_retrieved(caplog)) == 1
    caplog.clear()
    helped = loop.create_future()
    fail_future(helped, Cancelled("aborted"))
    del helped
    gc.collect()
    assert never_retrieved(caplog) == []


async def test_a_waiter_still_gets_the_error() -> None:
    future = asyncio.get_running_loop().create_future()
    waiter = asyncio.ensure_future(future)
    fail_future(future, Cancelled("aborted"))
    with pytest.raises(Cancelled, match="aborted"):
        await waiter
    with pytest.raises(asyncio.InvalidStateError):
        fail_future(future, Cancelled("twice"))
