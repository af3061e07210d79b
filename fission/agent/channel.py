"""The host's end of one agent channel: frames in, routed to the request they answer.

Several requests can be in flight on one channel (a run and file transfers beside it); each
waits on a queue of its own. Frames are read by short tasks, one frame each, started by whoever
waits on an empty queue, so a waiter that gives up (its deadline, a cancellation) never leaves
a frame half-read. A frame for no request in flight, one larger than ``MAX_GUEST_PAYLOAD`` or a
malformed header breaks the channel: every waiter, then every later call, gets that
``AgentProtocolError`` (the caller then destroys the VM). The egress tunnel's frames carry
stream ids, not request ids: they all go to one queue, ``TUNNEL_KEY``, and those of streams
the host opened (ids with ``INGRESS_BIT``: exposed ports, terminals) to ``INGRESS_KEY``. A queue
holds at most ``QUEUE_FRAMES`` frames; beyond that the channel stops reading until its
consumer catches up. Reading is throttled (``throttle.Throttle``: frames and bytes per
second), so a flooding guest slows down in its own queue instead of eating the host's CPU.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from fission.agent.throttle import Throttle
from fission.errors import AgentProtocolError, VMError
from fission.guest import protocol

QUEUE_FRAMES = 64
# Queue of the egress tunnel's frames (OPEN, STREAM, CLOSE, CREDIT), whatever their stream id.
TUNNEL_KEY = -1
# Queue of the frames of streams the host opened (CONNECT, PTY), whatever their stream id.
INGRESS_KEY = -2
ABANDONED_KEPT = 4096


class Channel:
    """Reads and writes whole frames; routes each incoming frame by its request id."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        throttle: Throttle | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._queues: dict[int, collections.deque[protocol.Frame]] = {}
        # Requests given up before their last frame: what the guest still sends is dropped.
        self._abandoned: dict[int, None] = {}
        self._reading: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._throttle = throttle or Throttle()
        self.failure: VMError | None = None

    async def read_frame(self) -> protocol.Frame:
        """Read one whole frame from the guest, whoever it is for."""
        try:
            header = await self._reader.readexactly(protocol.HEADER_SIZE)
            frame_type, request_id, length = protocol.parse_header(
                header, protocol.MAX_GUEST_PAYLOAD
            )
            payload = await self._reader.readexactly(length) if length else b""
            pause = self._throttle.delay(length)
            if pause > 0:
                await asyncio.sleep(pause)
        except protocol.ProtocolError as exc:
            raise AgentProtocolError(f"the guest sent a malformed frame: {exc}") from exc
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise VMError("the guest closed the agent channel (the VM stopped)") from exc
        return protocol.Frame(frame_type, request_id, payload)

    async def send(self, data: bytes) -> None:
        """Write bytes to the guest and wait until the transport takes them."""
        try:
            self._writer.write(data)
            await self._writer.drain()
        except ConnectionError as exc:
            raise VMError("the agent channel is closed (the VM stopped)") from exc

    def open(self, request_id: int) -> None:
        """Start routing frames of ``request_id`` to a queue of its own."""
        if self.failure is not None:
            raise self.failure
        self._queues[request_id] = collections.deque()

    def fail(self, error: VMError) -> None:
        """Break the channel: ``error`` is raised to every waiter and every later request."""
        if self.failure is None:
            self.failure = error
        self._room.set()

    def close(self, request_id: int, abandoned: bool = False) -> None:
        """Stop routing ``request_id``; with ``abandoned``, drop whatever the guest still sends."""
        self._queues.pop(request_id, None)
        if abandoned:
            self._abandoned[request_id] = None
            while len(self._abandoned) > ABANDONED_KEPT:
                del self._abandoned[next(iter(self._abandoned))]
        self._room.set()

    async def next(self, request_id: int) -> protocol.Frame:
        """The next frame for ``request_id`` (which must be open)."""
        queue = self._queues[request_id]
        while not queue:
            if self.failure is not None:
                raise self.failure
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read_one())
                self._reading.add_done_callback(_retrieve)
            try:
                await asyncio.shield(self._reading)
            except asyncio.CancelledError:
                # ``aclose`` cancelled the read under this waiter: the channel closed, the
                # waiter was not cancelled, so it gets the channel's error (the VM is gone).
                task = asyncio.current_task()
                if self.failure is None or task is None or task.cancelling():
                    raise
                raise self.failure from None
        frame = queue.popleft()
        self._room.set()
        return frame

    async def _read_one(self) -> None:
        try:
            frame = await self.read_frame()
            await self._route(frame)
        except VMError as exc:
            self.fail(exc)
            raise
        finally:
            self._reading = None

    async def _route(self, frame: protocol.Frame) -> None:
        key = frame.request_id
        if frame.type in protocol.STREAM_FRAMES:
            key = INGRESS_KEY if frame.request_id & protocol.INGRESS_BIT else TUNNEL_KEY
        queue = self._queues.get(key)
        if queue is None:
            if frame.request_id in self._abandoned:
                return
            running = ", ".join(str(rid) for rid in sorted(self._queues)) or "no request"
            raise AgentProtocolError(
                f"the guest answered request {frame.request_id} while {running} runs"
            )
        while len(queue) >= QUEUE_FRAMES and self._queues.get(key) is queue:
            if self.failure is not None:
                raise self.failure
            self._room.clear()
            await self._room.wait()
        if self._queues.get(key) is queue:
            queue.append(frame)

    async def aclose(self) -> None:
        """Stop reading and close the transport; requests still waiting get a VMError."""
        self.fail(VMError("the agent channel was closed (the VM is being destroyed)"))
        if self._reading is not None:
            self._reading.cancel()
        self._writer.close()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a reader task's exception as seen (the waiters, if any, got it already)."""
    if not task.cancelled():
        task.exception()
