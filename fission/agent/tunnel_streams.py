"""The host's end of the egress tunnel: guest connections arrive as streams on the agent channel.

``HostTunnel`` reads the tunnel's frames (the channel routes every OPEN, STREAM, CLOSE and
CREDIT frame to it), makes a ``TunnelStream`` per OPEN and hands it to a handler (the egress
proxy) in a task of its own. A stream buffers at most ``STREAM_WINDOW`` bytes from the guest and
sends at most that much before the guest's CREDIT; a guest that overruns it loses the stream.
Closing the tunnel cancels every handler, so nothing outlives the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from fission.agent.channel import TUNNEL_KEY, Channel
from fission.errors import VMError
from fission.guest import protocol
from fission.guest.protocol import FrameType

Handler = Callable[["TunnelStream"], Awaitable[None]]


class TunnelStream:
    """One guest connection, read and written like a socket (``read``, ``write``, ``close``)."""

    def __init__(self, channel: Channel, stream_id: int) -> None:
        self.id = stream_id
        self._channel = channel
        self._incoming = bytearray()
        self._eof = False  # the guest sends no more (it shut down its side, or is gone)
        self._reset = False  # the guest's connection is gone: nothing more can be written
        self._closed = False  # we closed
        self.exit_code: int | None = None  # a terminal's shell exited with it (its CLOSE said)
        self._readable = asyncio.Event()
        self._credit = protocol.STREAM_WINDOW
        self._writable = asyncio.Event()
        self._writable.set()

    def feed(self, data: bytes) -> bool:
        """Take bytes from the guest; False when they overrun the window."""
        if len(self._incoming) + len(data) > protocol.STREAM_WINDOW:
            return False
        self._incoming += data
        self._readable.set()
        return True

    def feed_eof(self, reset: bool = True) -> None:
        """The guest sends no more; with ``reset`` its connection is gone altogether."""
        self._eof = True
        self._reset = self._reset or reset
        self._readable.set()
        self._writable.set()

    def add_credit(self, amount: int) -> None:
        """The guest took ``amount`` more bytes off its buffer."""
        self._credit = min(self._credit + amount, protocol.STREAM_WINDOW)
        self._writable.set()

    async def read(self, limit: int = protocol.STREAM_CHUNK) -> bytes:
        """Up to ``limit`` bytes from the guest; empty once it has closed."""
        while not self._incoming and not self._eof:
            self._readable.clear()
            await self._readable.wait()
        data = bytes(self._incoming[:limit])
        del self._incoming[:limit]
        if data and not self._reset:
            message = {"bytes": len(data)}
            with contextlib.suppress(VMError):
                await self._channel.send(protocol.encode_json(FrameType.CREDIT, self.id, message))
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the guest within its window; ConnectionResetError once it closed."""
        view = memoryview(data)
        while view:
            while self._credit <= 0 and not self._reset:
                self._writable.clear()
                await self._writable.wait()
            if self._reset or self._closed:
                raise ConnectionResetError("the guest closed the connection")
            piece = view[: min(self._credit, protocol.STREAM_CHUNK)]
            self._credit -= len(piece)
            view = view[len(piece) :]
            await self._channel.send(protocol.encode(FrameType.STREAM, self.id, bytes(piece)))

    async def close(self) -> None:
        """Tell the guest this stream is over (it flushes what it holds, then closes)."""
        if self._closed:
            return
        self._closed = True
        if not self._reset:
            with contextlib.suppress(VMError):
                await self._channel.send(protocol.encode_json(FrameType.CLOSE, self.id, {}))
        self.feed_eof()


class HostTunnel:
    """Serves a VM's tunnel streams with ``handler`` until ``aclose``; at most ``max_streams``."""

    def __init__(self, channel: Channel, handler: Handler, max_streams: int) -> None:
        self._channel = channel
        self._handler = handler
        self._max_streams = max_streams
        self.streams: dict[int, TunnelStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None
        self.refused = 0

    def start(self) -> None:
        """Start routing the tunnel's frames here."""
        self._channel.open(TUNNEL_KEY)
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                frame = await self._channel.next(TUNNEL_KEY)
                await self._on_frame(frame)
        except VMError:
            pass  # the VM went away; aclose cleans up
        finally:
            for stream in self.streams.values():
                stream.feed_eof()

    async def _on_frame(self, frame: protocol.Frame) -> None:
        stream = self.streams.get(frame.request_id)
        if frame.type == FrameType.OPEN:
            if stream is not None or len(self.streams) >= self._max_streams:
                self.refused += 1
                await self._channel.send(
                    protocol.encode_json(FrameType.CLOSE, frame.request_id, {})
                )
                return
            stream = TunnelStream(self._channel, frame.request_id)
            self.streams[stream.id] = stream
            task = asyncio.create_task(self._serve(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif stream is None:
            return  # a stream this side has already closed
        elif frame.type == FrameType.STREAM:
            if not stream.feed(frame.payload):
                await stream.close()
        elif frame.type == FrameType.CREDIT:
            amount = protocol.decode_json(frame.payload).get("bytes")
            if type(amount) is int and amount > 0:
                stream.add_credit(amount)
        elif frame.type == FrameType.CLOSE:
            how = protocol.decode_json(frame.payload).get("how")
            stream.feed_eof(reset=how != "eof")

    async def _serve(self, stream: TunnelStream) -> None:
        try:
            await self._handler(stream)
        except Exception:  # one connection's failure never stops the others
            pass
        finally:
            await stream.close()
            self.streams.pop(stream.id, None)

    async def aclose(self) -> None:
        """Stop serving: cancel the pump and every connection's handler, then wait for them."""
        tasks = [*self._tasks, *([self._pump] if self._pump is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._channel.close(TUNNEL_KEY)
