"""``files.watch``'s stream of changes (blocking); ``_watch_async`` is the asyncio twin."""

from __future__ import annotations

from collections.abc import Generator

from fission.sdk import _requests as calls
from fission.sdk._models import WatchEvent


class WatchStream:
    """The changes under a watched directory (``files.watch``), as ``WatchEvent``s."""

    def __init__(self, lines: Generator[str, None, None]) -> None:
        self._lines = lines
        try:
            for raw in lines:
                if calls.is_watch_ready(raw):
                    return
        except BaseException:
            lines.close()
            raise
        raise calls.missing_result()

    def __iter__(self) -> Generator[WatchEvent, None, None]:
        for raw in self._lines:
            event = calls.parse_watch_line(raw)
            if event is not None:
                yield event

    def close(self) -> None:
        """End the watch (safe twice)."""
        self._lines.close()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
