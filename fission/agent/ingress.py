"""Streams the host opens into a guest: exposed ports (CONNECT) and terminals (PTY).

The egress tunnel the other way round: the host picks the stream id (``INGRESS_BIT`` set, so
it never meets a guest-chosen egress id), sends CONNECT {port} or PTY {cols, rows, ...}, and the
guest answers OPEN once the stream is up or CLOSE if it cannot be (nothing listens on the port).
From then on the stream is a ``TunnelStream``: flow-controlled both ways by the same window and
CREDIT frames, at most ``STREAM_WINDOW`` bytes buffered here, a guest that overruns it losing
the stream; a terminal's ends with CLOSE ``exit`` {exit_code} when its shell exits. The guest
is hostile: an OPEN, STREAM or CREDIT for a stream the host did not open is ignored, a bad
CREDIT changes nothing. ``aclose`` ends every stream (the sandbox paused, stopped or was
deleted), so nothing outlives the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fission.agent.channel import INGRESS_KEY, Channel
from fission.agent.tunnel_streams import TunnelStream
from fission.errors import Busy, VMError
from fission.guest import protocol
from fission.guest.protocol import FrameType

OPEN_TIMEOUT = 10.0  # seconds the guest has to answer a CONNECT or PTY
MAX_DETAIL = 200  # characters of the guest's reason for a refusal that are kept


class StreamRefused(Exception):
    """The guest could not open the stream (nothing listens on the port, no shell)."""


class IngressTunnel:
    """The streams the host opened into one VM; at most ``max_streams`` at once."""

    def __init__(self, channel: Channel, max_streams: int) -> None:
        self._channel = channel
        self._max_streams = max_streams
        self.streams: dict[int, TunnelStream] = {}
        self._opening: dict[int, asyncio.Future[str | None]] = {}
        self._next_id = 0
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start routing the guest's answers on host-opened streams here."""
        self._channel.open(INGRESS_KEY)
        self._pump = asyncio.create_task(self._run())

    async def connect(self, port: int, timeout: float = OPEN_TIMEOUT) -> TunnelStream:
        """A stream to 127.0.0.1:``port`` in the guest; StreamRefused if nothing listens."""
        return await self._open(FrameType.CONNECT, {"port": port}, timeout)

    async def pty(self, request: dict[str, Any], timeout: float = OPEN_TIMEOUT) -> TunnelStream:
        """A shell on a new terminal in the guest ({cols, rows, env, cwd, memory_bytes,
        pids_max}); its stream carries the terminal's bytes both ways."""
        return await self._open(FrameType.PTY, request, timeout)

    async def resize(self, stream: TunnelStream, cols: int, rows: int) -> None:
        """Tell the guest the terminal of ``stream`` is now ``cols`` x ``rows``."""
        message = {"cols": cols, "rows": rows}
        with contextlib.suppress(VMError):
            await self._channel.send(protocol.encode_json(FrameType.RESIZE, stream.id, message))

    async def _open(
        self, frame_type: FrameType, message: dict[str, Any], timeout: float
    ) -> TunnelStream:
        if self._closed:
            raise VMError("the sandbox's streams are closed (it paused or stopped)")
        if len(self.streams) >= self._max_streams:
            raise Busy(
                f"the sandbox has {self._max_streams} port and terminal streams open already: "
                "close some first"
            )
        self._next_id = self._next_id % (protocol.INGRESS_BIT - 1) + 1
        stream = TunnelStream(self._channel, protocol.INGRESS_BIT | self._next_id)
        opened: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.streams[stream.id] = stream
        self._opening[stream.id] = opened
        try:
            await self._channel.send(protocol.encode_json(frame_type, stream.id, message))
            async with asyncio.timeout(timeout):
                refusal = await opened
        except BaseException:
            self.streams.pop(stream.id, None)
            await stream.close()
            raise
        finally:
            self._opening.pop(stream.id, None)
        if refusal is not None:
            self.streams.pop(stream.id, None)
            raise StreamRefused(refusal)
        return stream

    async def _run(self) -> None:
        try:
            while True:
                frame = await self._channel.next(INGRESS_KEY)
                self._on_frame(frame)
        except VMError:
            pass  # the VM went away; aclose cleans up
        finally:
            self._end_all()

    def _on_frame(self, frame: protocol.Frame) -> None:
        stream = self.streams.get(frame.request_id)
        if stream is None:
            return  # a stream this side never opened or already closed
        opening = self._opening.get(frame.request_id)
        if frame.type == FrameType.OPEN:
            if opening is not None and not opening.done():
                opening.set_result(None)
        elif frame.type == FrameType.STREAM:
            if opening is not None or not stream.feed(frame.payload):
                self._drop(stream)  # data before OPEN, or beyond the window
        elif frame.type == FrameType.CREDIT:
            amount = decode(frame).get("bytes")
            if type(amount) is int and amount > 0:
                stream.add_credit(amount)
        elif frame.type == FrameType.CLOSE:
            message = decode(frame)
            if opening is not None and not opening.done():
                detail = message.get("error")
                opening.set_result(str(detail)[:MAX_DETAIL] if detail else "refused")
                return
            code = message.get("exit_code")
            if message.get("how") == "exit" and type(code) is int and 0 <= code <= 255:
                stream.exit_code = code
            stream.feed_eof(reset=message.get("how") != "eof")
        # any other type (CONNECT, PTY, RESIZE) is the host's to send: ignored

    def _drop(self, stream: TunnelStream) -> None:
        """End a stream the guest misused; it is told so with CLOSE."""
        self.streams.pop(stream.id, None)
        stream.feed_eof()
        task = asyncio.ensure_future(stream.close())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def release(self, stream: TunnelStream) -> None:
        """Close ``stream`` (the guest flushes and closes its end) and stop routing it."""
        self.streams.pop(stream.id, None)
        await stream.close()

    def _end_all(self) -> None:
        for opening in self._opening.values():
            if not opening.done():
                opening.set_result("the sandbox's VM went away")
        for stream in self.streams.values():
            stream.feed_eof()

    async def aclose(self) -> None:
        """End every stream and stop routing (safe twice)."""
        if self._closed:
            return
        self._closed = True
        self._end_all()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        self.streams.clear()
        self._channel.close(INGRESS_KEY)


def decode(frame: protocol.Frame) -> dict[str, Any]:
    """A control frame's JSON, or empty when the guest sent garbage (it only loses its stream)."""
    try:
        return protocol.decode_json(frame.payload)
    except protocol.ProtocolError:
        return {}
