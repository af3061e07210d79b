"""The host side of file watches (``guest/watch.py``): WATCH, then a stream of checked events.

The guest's EVENT frames are read by a task of the watch's own as soon as they arrive, into a
bounded queue (``MAX_QUEUED`` events, then one ``overflow`` event): a consumer that reads slowly
(a slow HTTP client) never holds up the channel, which every other request of the VM shares.
Every event is hostile until checked: a frame that is not EVENT or the watch's final RESULT, or
an event of an unknown type or with a bad path, is an ``AgentProtocolError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fission.agent.file_ops import FileOperations, Pending, decode, display_path, guest_error
from fission.errors import AgentProtocolError, VMError
from fission.guest import files, protocol
from fission.guest.protocol import FrameType

EVENT_TYPES = frozenset({"create", "modify", "delete", "move", "chmod", "overflow"})
MAX_QUEUED = 4096  # events held for a slow consumer before they are dropped as ``overflow``
MAX_EVENTS_PER_FRAME = 1000


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched directory; paths are relative to it."""

    type: str  # create, modify, delete, move, chmod, or overflow (events were lost)
    path: str = ""  # empty for ``overflow``
    to: str | None = None  # a ``move``'s new name when it stays under the watch


def parse_watch_event(message: object) -> WatchEvent:
    """Check one event object from the guest."""
    if not isinstance(message, dict):
        raise AgentProtocolError("the guest sent a watch event that is not an object")
    kind, path, to = message.get("type"), message.get("path", ""), message.get("to")
    if kind not in EVENT_TYPES:
        raise AgentProtocolError(f"the guest sent a bad watch event type {kind!r:.40}")
    for value in (path, to):
        if value is None and value is to:
            continue
        if not isinstance(value, str) or len(value) > files.MAX_PATH or "\0" in value:
            raise AgentProtocolError(f"the guest sent a bad watch event path {value!r:.80}")
    if kind != "overflow" and not path:
        raise AgentProtocolError("the guest sent a watch event without a path")
    return WatchEvent(str(kind), str(path), to if isinstance(to, str) else None)


class EventQueue:
    """Events waiting for the consumer: bounded, with one ``overflow`` for what was dropped."""

    def __init__(self, limit: int = MAX_QUEUED) -> None:
        self.limit = limit
        self.events: collections.deque[WatchEvent] = collections.deque()
        self.ready = asyncio.Event()
        self.end: BaseException | str | None = None  # why the stream ended

    def put(self, event: WatchEvent) -> None:
        """Queue ``event``; past the limit, the last place says ``overflow``."""
        if len(self.events) >= self.limit:
            self.events[-1] = WatchEvent("overflow")
        elif not (self.events and self.events[-1] == event and event.type == "modify"):
            self.events.append(event)
        self.ready.set()

    def finish(self, why: BaseException | str) -> None:
        """No more events will come."""
        if self.end is None:
            self.end = why
        self.ready.set()

    def take(self) -> list[WatchEvent]:
        """Everything queued now."""
        batch = list(self.events)
        self.events.clear()
        if self.end is None:
            self.ready.clear()
        return batch


class FileWatches(FileOperations):
    """The file methods of the agent client, with watches."""

    async def watch_files(
        self, path: str, *, recursive: bool = False, timeout: float
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Yield batches of changes under directory ``path`` until closed or the VM ends.

        The first batch is empty, once the watch is in place (changes from then on are seen).

        ``timeout`` (seconds) bounds the start of the watch only. Closing the generator ends
        the watch in the guest; the VM stopping ends the generator (quietly).
        """
        display_path(path)
        what = f"watch {path!r}"
        queue = EventQueue()
        async with self._request() as pending:
            message = {"path": path, "recursive": bool(recursive)}
            await self._channel.send(protocol.encode_json(FrameType.WATCH, pending.id, message))
            async with asyncio.timeout(timeout):
                first = await self._channel.next(pending.id)
            if first.type == FrameType.ERROR:
                pending.finished = True
                raise guest_error(decode(first), what)
            if first.type != FrameType.RESULT:
                raise AgentProtocolError(f"unexpected {first.type.name} frame answering {what}")
            pump = asyncio.ensure_future(self._pump_events(pending, queue))
            try:
                yield []  # the watch is in place
                while True:
                    await queue.ready.wait()
                    batch = queue.take()
                    if batch:
                        yield batch
                    elif queue.end is not None:
                        if isinstance(queue.end, AgentProtocolError):
                            raise queue.end
                        return
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _pump_events(self, pending: Pending, queue: EventQueue) -> None:
        """Move the guest's events into ``queue`` as they arrive, until the watch ends."""
        try:
            while True:
                frame = await self._channel.next(pending.id)
                if frame.type == FrameType.RESULT:
                    pending.finished = True
                    queue.finish(str(decode(frame).get("ended", "the watch ended")))
                    return
                if frame.type != FrameType.EVENT:
                    raise AgentProtocolError(f"unexpected {frame.type.name} frame during a watch")
                events: Any = decode(frame).get("events")
                if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_FRAME:
                    raise AgentProtocolError("the guest sent a malformed watch event frame")
                for item in events:
                    queue.put(parse_watch_event(item))
        except AgentProtocolError as exc:
            self._channel.fail(exc)
            queue.finish(exc)
        except VMError as exc:  # the VM stopped: the watch is over
            pending.finished = True
            queue.finish(exc)
