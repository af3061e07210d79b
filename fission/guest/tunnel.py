"""The guest's end of the egress tunnel (stdlib only): a local port whose connections go out.

The VM has no network device. When a run may reach the network, the host sends LISTEN and the
agent listens on 127.0.0.1:<port> inside the guest; each accepted connection becomes a stream
(OPEN, then STREAM bytes both ways, then CLOSE) over the agent channel, and the host-side egress
proxy decides where, if anywhere, it goes. The guest's CLOSE says ``eof`` (the program shut
down its sending side and may still read) or ``reset`` (the connection is gone); the host's
CLOSE ends the stream once its bytes are written. Flow control is by window: a side sends at most
``STREAM_WINDOW`` bytes the peer has not yet acknowledged with CREDIT, so neither side ever holds
more than that per stream; a peer that overruns the window loses the stream.

The host opens streams too (ids with ``INGRESS_BIT`` set): CONNECT {port} joins a program
listening on 127.0.0.1:port inside the guest (an exposed port), PTY starts a shell on a new
terminal (``terminal.py``; RESIZE changes its size). The agent answers OPEN once the stream is
up, or CLOSE ``reset`` if it cannot be; from then on it is a stream like any other. When a
terminal's shell exits, the rest of its session is killed (a hang-up), its output drains, and
CLOSE ``exit`` {exit_code} ends the stream.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

if __package__:
    from . import protocol, terminal
else:  # run as a script inside the guest, with its modules beside it
    import protocol  # type: ignore[no-redef]
    import terminal  # type: ignore[no-redef]

Send = Callable[[protocol.FrameType, int, bytes], None]
READ_CHUNK = protocol.STREAM_CHUNK


class Stream:
    """One accepted connection: bytes to write to it, and how much the host still takes."""

    def __init__(self, stream_id: int, sock: socket.socket | terminal.Terminal) -> None:
        self.id = stream_id
        self.sock = sock  # a socket, or a terminal read and written like one
        self.connecting = False  # a CONNECT still in progress: OPEN once it is done
        self.outgoing = bytearray()  # from the host, not yet written to the program
        self.credit = protocol.STREAM_WINDOW  # bytes the host takes before its next CREDIT
        self.closing = False  # the host closed: close once ``outgoing`` is written
        self.read_done = False  # the program shut down its writing side; the host knows
        self.exit_code: int | None = None  # a terminal's shell exited (its code)
        self.events = 0


class GuestTunnel:
    """Listens on the proxy port and moves bytes between its connections and the host."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        send: Send,
        remove_cgroup_later: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.selector = selector
        self.send = send
        self.remove_cgroup_later = remove_cgroup_later
        self.listener: socket.socket | None = None
        self.streams: dict[int, Stream] = {}
        self.next_id = 1

    def listen(self, port: int) -> None:
        """Start accepting on 127.0.0.1:``port`` (again: no-op)."""
        if self.listener is not None:
            return
        if not 1 <= port <= 65535:
            raise ValueError(f"bad proxy port {port}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ, ("tunnel", None))

    def on_event(self, stream: Stream | None, mask: int) -> None:
        """React to the listener (``stream`` None) or a stream's socket being ready."""
        if stream is None:
            self._accept()
            return
        if stream.connecting:
            if mask & selectors.EVENT_WRITE:
                self._connected(stream)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(stream)
        if mask & selectors.EVENT_READ and stream.id in self.streams:
            self._read(stream)

    def handle(self, frame: protocol.Frame) -> None:
        """Act on one tunnel frame from the host."""
        if frame.type in (protocol.FrameType.CONNECT, protocol.FrameType.PTY):
            self._open(frame)
            return
        stream = self.streams.get(frame.request_id)
        if stream is None:
            return  # a stream that ended here first; the host learns it from our CLOSE
        if frame.type == protocol.FrameType.RESIZE:
            if isinstance(stream.sock, terminal.Terminal):
                # A bad size leaves the terminal as it was; the stream goes on.
                with contextlib.suppress(OSError, ValueError, protocol.ProtocolError):
                    stream.sock.resize(protocol.decode_json(frame.payload))
        elif frame.type == protocol.FrameType.STREAM:
            if len(stream.outgoing) + len(frame.payload) > protocol.STREAM_WINDOW:
                self._end(stream, reset=True)  # the host overran the window
                return
            stream.outgoing += frame.payload
            self._flush(stream)
        elif frame.type == protocol.FrameType.CREDIT:
            amount = protocol.decode_json(frame.payload).get("bytes")
            if isinstance(amount, int) and amount > 0:
                stream.credit = min(stream.credit + amount, protocol.STREAM_WINDOW)
                self._watch(stream)
        elif frame.type == protocol.FrameType.CLOSE:
            stream.closing = True
            self._flush(stream)
        else:
            raise ValueError(f"frame type {frame.type.name} is not for the guest")

    def _open(self, frame: protocol.Frame) -> None:
        """A stream the host opens (CONNECT, PTY): OPEN when it is up, else CLOSE ``reset``."""
        stream_id = frame.request_id
        if not stream_id & protocol.INGRESS_BIT or stream_id in self.streams:
            return  # not an id the host may open (an answer would end another stream)
        try:
            if len(self.streams) >= protocol.MAX_STREAMS:
                raise ValueError(f"{protocol.MAX_STREAMS} streams are open already")
            message = protocol.decode_json(frame.payload)
            if frame.type == protocol.FrameType.PTY:
                endpoint: socket.socket | terminal.Terminal = terminal.spawn(
                    message, f"pty-{stream_id & ~protocol.INGRESS_BIT}", self.remove_cgroup_later
                )
                waiting = False
            else:
                endpoint, waiting = connect_local(message.get("port"))
        except (OSError, ValueError, protocol.ProtocolError) as exc:
            detail = {"how": "reset", "error": str(exc)[:200]}
            self.send(protocol.FrameType.CLOSE, stream_id, protocol.dump_json(detail))
            return
        stream = Stream(stream_id, endpoint)
        stream.connecting = waiting
        self.streams[stream_id] = stream
        if not waiting:
            self.send(protocol.FrameType.OPEN, stream_id, b"{}")
        self._watch(stream)

    def _connected(self, stream: Stream) -> None:
        """A CONNECT in progress finished: OPEN, or CLOSE ``reset`` if it failed."""
        assert isinstance(stream.sock, socket.socket)
        error = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._end(stream, reset=True)
            return
        stream.connecting = False
        self.send(protocol.FrameType.OPEN, stream.id, b"{}")
        self._watch(stream)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if len(self.streams) >= protocol.MAX_STREAMS:
            sock.close()
            return
        sock.setblocking(False)
        stream = Stream(self.next_id, sock)
        self.next_id = self.next_id % (protocol.INGRESS_BIT - 16) + 1  # below the host's ids
        self.streams[stream.id] = stream
        self.send(protocol.FrameType.OPEN, stream.id, b"{}")
        self._watch(stream)

    def _read(self, stream: Stream) -> None:
        try:
            data = stream.sock.recv(min(READ_CHUNK, stream.credit))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data and isinstance(stream.sock, terminal.Terminal):
            self._terminal_drained(stream)
            return
        if not data:  # end of what the program sends; it may still read the answer
            stream.read_done = True
            self.send(protocol.FrameType.CLOSE, stream.id, protocol.dump_json({"how": "eof"}))
            self._watch(stream)
            return
        stream.credit -= len(data)
        self.send(protocol.FrameType.STREAM, stream.id, data)
        self._watch(stream)

    def child_exited(self, pid: int, status: int) -> bool:
        """A child the agent reaped: if it is a terminal's shell, hang the terminal up (the
        session's leftovers are killed) so its output drains; True when it was one."""
        for stream in self.streams.values():
            if isinstance(stream.sock, terminal.Terminal) and stream.sock.pid == pid:
                stream.exit_code = exit_code_of(status)
                stream.sock.hang_up()
                if stream.read_done:
                    self._finish_terminal(stream)
                return True
        return False

    def _terminal_drained(self, stream: Stream) -> None:
        """Nothing holds the terminal open any more (EIO): end the stream once the shell's
        exit is known (the agent may not have reaped it yet)."""
        assert isinstance(stream.sock, terminal.Terminal)
        stream.read_done = True
        if stream.exit_code is None:
            status = stream.sock.try_wait()
            if status is not None:
                stream.exit_code = exit_code_of(status)
        if stream.exit_code is not None:
            self._finish_terminal(stream)
        else:
            self._watch(stream)

    def _finish_terminal(self, stream: Stream) -> None:
        """Tell the host the shell's exit code (CLOSE ``exit``), then forget the stream."""
        message = {"how": "exit", "exit_code": stream.exit_code}
        self.send(protocol.FrameType.CLOSE, stream.id, protocol.dump_json(message))
        self._end(stream, reset=False)

    def _flush(self, stream: Stream) -> None:
        written = 0
        try:
            while stream.outgoing:
                count = stream.sock.send(stream.outgoing[:READ_CHUNK])
                del stream.outgoing[:count]
                written += count
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the program is gone
            self._end(stream, reset=not stream.closing)
            return
        if written and not stream.closing:
            self.send(protocol.FrameType.CREDIT, stream.id, protocol.dump_json({"bytes": written}))
        if stream.closing and not stream.outgoing:
            self._end(stream, reset=False)
            return
        self._watch(stream)

    def _watch(self, stream: Stream) -> None:
        """Listen for what the stream can do next: read while the host has room, write a backlog."""
        if stream.id not in self.streams:
            return
        events = 0
        if stream.connecting:
            events = selectors.EVENT_WRITE
        elif stream.credit > 0 and not stream.closing and not stream.read_done:
            events |= selectors.EVENT_READ
        if stream.outgoing and not stream.connecting:
            events |= selectors.EVENT_WRITE
        if events == stream.events:
            return
        if stream.events and events:
            self.selector.modify(stream.sock, events, ("tunnel", stream))
        elif events:
            self.selector.register(stream.sock, events, ("tunnel", stream))
        else:
            self.selector.unregister(stream.sock)
        stream.events = events

    def drop(self, stream: Stream) -> None:
        """End ``stream`` after a failure, telling the host (best effort)."""
        with contextlib.suppress(Exception):
            self._end(stream, reset=True)

    def _end(self, stream: Stream, reset: bool) -> None:
        """Forget a stream and close its socket; ``reset`` tells the host it is gone."""
        self.streams.pop(stream.id, None)
        if stream.events:
            self.selector.unregister(stream.sock)
            stream.events = 0
        with contextlib.suppress(OSError):
            stream.sock.close()
        if reset:
            self.send(protocol.FrameType.CLOSE, stream.id, protocol.dump_json({"how": "reset"}))

    def state(self) -> dict[str, Any]:
        """What the tunnel holds (for tests and logs)."""
        return {"listening": self.listener is not None, "streams": len(self.streams)}


def exit_code_of(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal's number."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255


def connect_local(port: object) -> tuple[socket.socket, bool]:
    """A non-blocking connection to 127.0.0.1:``port``, and whether it is still in progress."""
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"CONNECT needs a port from 1 to 65535, not {port!r}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    error = sock.connect_ex(("127.0.0.1", port))
    if error not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(error, f"cannot connect to port {port}: {os.strerror(error)}")
    return sock, error == errno.EINPROGRESS
