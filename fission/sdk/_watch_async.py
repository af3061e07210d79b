"""``files.watch``'s stream of changes for asyncio; ``_watch`` is the blocking twin."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fission.sdk import _requests as calls
from fission.sdk._models import WatchEvent


class AsyncWatchStream:
    """The changes under a watched directory (``files.watch``), as ``WatchEvent``s."""

    def __init__(self, lines: AsyncGenerator[str, None]) -> None:
        self._lines = lines

    async def __aiter__(self) -> AsyncGenerator[WatchEvent, None]:
        async for raw in self._lines:
            event = calls.parse_watch_line(raw)
            if event is not None:
                yield event

    async def close(self) -> None:
        """End the watch (safe twice)."""
        await self._lines.aclose()

    async def __aenter__(self) -> AsyncWatchStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
