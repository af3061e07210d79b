"""A stand-in for the daemon on a Unix socket: canned HTTP answers, every request recorded.

It speaks real HTTP/1.1 on a real socket, so the CLI's fast path and the SDK's kept connection
are tested as they run, framing and keep-alive included, without a VM.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from fission.api.run_stream import error_body
from fission.errors import FissionError


@dataclass
class Request:
    """One request the fake daemon received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which connection it came on (keep-alive reuses one)

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


@dataclass
class Answer:
    """Raw response bytes, and whether the connection closes after them."""

    raw: bytes
    close: bool = False


def ndjson_lines(*lines: dict[str, Any]) -> bytes:
    """Lines as the daemon streams them."""
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chunked(body: bytes, size: int = 7) -> Answer:
    """A 200 NDJSON answer in chunks of ``size`` bytes (lines split across chunks)."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
    head += b"transfer-encoding: chunked\r\n\r\n"
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return Answer(head + chunks + b"0\r\n\r\n")


def sized(body: bytes, status: str = "200 OK", kind: str = "application/x-ndjson") -> Answer:
    """An answer with a Content-Length (the connection stays open)."""
    head = f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n\r\n"
    return Answer(head.encode() + body)


def until_close(body: bytes) -> Answer:
    """A 200 NDJSON answer whose end is the connection's close (no length, not chunked)."""
    return Answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body, close=True)


def refusal(error: FissionError) -> Answer:
    """The daemon's JSON error answer for ``error``."""
    body = json.dumps({"error": error_body(error)}).encode()
    return sized(body, f"{error.http_status} Refused", "application/json")


@dataclass
class FakeDaemon:
    """The server's state: requests seen, connections accepted, what to answer next."""

    socket: Path
    answer: Callable[[Request], Answer]
    requests: list[Request] = field(default_factory=list)
    connections: int = 0


@contextmanager
def fake_daemon(socket: Path, answer: Callable[[Request], Answer]) -> Iterator[FakeDaemon]:
    """Serve ``answer`` on ``socket`` in a thread for the with block."""
    state = FakeDaemon(socket, answer)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            state.connections += 1
            self.number = state.connections

        def handle_one_request(self) -> None:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or not self.parse_request():
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length", 0))
            request = Request(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length),
                self.number,
            )
            state.requests.append(request)
            reply = state.answer(request)
            self.wfile.write(reply.raw)
            self.wfile.flush()
            self.close_connection = reply.close or self.headers.get("Connection") == "close"

        def log_message(self, *args: Any) -> None:
            """Quiet."""

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    socket.unlink(missing_ok=True)  # a dead daemon's socket file, as `fission serve` does
    server = Server(str(socket), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        socket.unlink(missing_ok=True)
