"""Server-sent events as OpenAI-compatible servers stream them.

Every chunk is one event with a single `data: {json}` line, followed by a blank line; the
stream ends with `data: [DONE]`. Some servers name error events (`event: error`). Each `data:`
line is handed out as soon as it is read, so its arrival time is the chunk's: a data field
split over several lines (allowed by the SSE spec, sent by no OpenAI-compatible server) would
come out as several items. Comment lines (`: keep-alive`) and other fields are skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

DONE = "[DONE]"


@dataclass(frozen=True)
class SseData:
    """One `data:` line: its text and the `event:` name in force ("" for the default)."""

    event: str
    data: str

    @property
    def done(self) -> bool:
        return self.data.strip() == DONE


async def sse_data(lines: AsyncIterable[bytes]) -> AsyncIterator[SseData]:
    """The `data:` lines of an SSE byte stream split into lines (aiohttp's
    `response.content`). Raises UnicodeDecodeError for a line that is not UTF-8; reading
    errors of `lines` propagate."""
    event = ""
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            event = ""  # a blank line ends the event
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            yield SseData(event, value)
