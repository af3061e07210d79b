"""The framed binary protocol between the host and the guest agent.

Shared verbatim by both sides, so it is stdlib-only and runs on the guest's Python (3.9+).

A frame is a 12-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       2     magic  b"FS"
    2       1     version (PROTOCOL_VERSION)
    3       1     frame type (FrameType)
    4       4     request id, big-endian (0 for frames outside any request)
    8       4     payload length, big-endian

Output (STDOUT, STDERR), STDIN, DATA and STREAM payloads are raw bytes; control frames carry a JSON
object encoded as UTF-8. A decoder is given the largest payload it accepts: the host accepts at most
MAX_GUEST_PAYLOAD from a guest, so a hostile guest cannot make the host buffer more than that.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, NamedTuple

MAGIC = b"FS"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">2sBBII")
HEADER_SIZE = HEADER.size

# Largest payload the host accepts from a guest: output chunks are sent in pieces of at most
# OUTPUT_CHUNK bytes, and control frames are small.
OUTPUT_CHUNK = 64 * 1024
MAX_GUEST_PAYLOAD = 256 * 1024
# Largest payload the guest accepts from the host: an EXEC frame carries the program's source.
MAX_HOST_PAYLOAD = 32 * 1024 * 1024


class FrameType(enum.IntEnum):
    """What a frame means; the direction is given in each member's comment."""

    INIT = 1  # host -> guest: {time_ns, seed, restored}; the agent answers HELLO
    HELLO = 2  # guest -> host: {protocol, agent, kernel}
    EXEC = 3  # host -> guest: an ExecRequest as JSON
    STDIN = 4  # host -> guest: raw bytes for the program's stdin; empty payload = EOF
    STDOUT = 5  # guest -> host: raw bytes the program wrote to stdout
    STDERR = 6  # guest -> host: raw bytes the program wrote to stderr
    EXIT = 7  # guest -> host: {exit_code, signal, timed_out, oom, output_truncated, duration_ms}
    KILL = 8  # host -> guest: {} stop the request's program now
    ERROR = 9  # guest -> host: {message} the request failed inside the agent
    PING = 10  # host -> guest: {}
    PONG = 11  # guest -> host: {}
    PREPARE = 12  # host -> guest: {} get ready to be snapshotted (fork server warm, disks synced)
    READY = 13  # guest -> host: {zygote: bool} ready for the snapshot
    FILE = 14  # host -> guest: {op, path, ...} one file operation (see files.py)
    DATA = 15  # both ways: raw bytes of a file being written or read; empty = end of a write
    RESULT = 16  # guest -> host: {...} the answer to FILE or DROP
    DROP = 17  # host -> guest: {context} end a code context and its process
    LISTEN = 18  # host -> guest: {port} open the egress proxy port; answered with RESULT
    OPEN = 19  # guest -> host: {} a program connected to the proxy port: stream <request id>
    STREAM = 20  # both ways: raw bytes of a stream (within the peer's window)
    CLOSE = 21  # both ways: {} the stream is over (the peer flushes what it holds, then closes)
    CREDIT = 22  # both ways: {bytes} the sender consumed that many bytes: the window reopens
    # 40-49: streams the host opens (exposed ports, terminals); their ids have INGRESS_BIT set.
    CONNECT = 40  # host -> guest: {port} connect to 127.0.0.1:port; answered OPEN or CLOSE
    PTY = 41  # host -> guest: {cols, rows, ...} a shell on a new terminal; answered OPEN or CLOSE
    RESIZE = 42  # host -> guest: {cols, rows} the terminal of stream <request id> changed size
    # File watches (watch.py); numbered from 50 so that other features can grow below.
    WATCH = 50  # host -> guest: {path, recursive}; RESULT {path}, then EVENTs; KILL ends it
    EVENT = 51  # guest -> host: {events: [{type, path, to?}, ...]} changes under a watch


# Frames of the tunnel (``tunnel.py``): their request id is a stream id, not a request.
STREAM_FRAMES = frozenset(
    {
        FrameType.OPEN,
        FrameType.STREAM,
        FrameType.CLOSE,
        FrameType.CREDIT,
        FrameType.CONNECT,
        FrameType.PTY,
        FrameType.RESIZE,
    }
)
# Streams the host opens (CONNECT, PTY) have ids with this bit set; the guest's own (egress)
# stream ids stay below it, so the two never collide and each side routes by the id alone.
INGRESS_BIT = 0x80000000
# Bytes a side may send on one stream before the peer's CREDIT; each STREAM frame's payload is
# at most STREAM_CHUNK. Both bound what either side buffers per stream.
STREAM_WINDOW = 256 * 1024
STREAM_CHUNK = 32 * 1024
# Streams the guest keeps open at once; the host has its own (lower) cap per VM.
MAX_STREAMS = 64


# Largest piece of a file in one DATA frame, either way (well under both payload limits).
FILE_CHUNK = 128 * 1024

# Error codes an ERROR frame may carry ({code, message}); the host maps them to its errors.
PATH_NOT_ALLOWED = "path_not_allowed"
FILE_NOT_FOUND = "file_not_found"
INVALID_INPUT = "invalid_input"


class ProtocolError(Exception):
    """Bytes that are not a valid frame (bad magic, version, type, size or JSON)."""


class AgentError(Exception):
    """A request the agent refuses or cannot carry out, sent back as ERROR {code, message}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Frame(NamedTuple):
    """One decoded frame."""

    type: FrameType
    request_id: int
    payload: bytes


def encode(frame_type: FrameType, request_id: int, payload: bytes = b"") -> bytes:
    """Return the wire bytes of one frame."""
    if not 0 <= request_id <= 0xFFFFFFFF:
        raise ProtocolError(f"request id {request_id} does not fit in 32 bits")
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, int(frame_type), request_id, len(payload))
    return header + payload


def dump_json(message: dict[str, Any]) -> bytes:
    """Return the payload of a control frame carrying ``message``."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_json(frame_type: FrameType, request_id: int, message: dict[str, Any]) -> bytes:
    """Return the wire bytes of a control frame carrying ``message`` as JSON."""
    return encode(frame_type, request_id, dump_json(message))


def decode_json(payload: bytes) -> dict[str, Any]:
    """Parse a control frame's payload; anything but a JSON object is a ProtocolError."""
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"control frame is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # a hostile peer can nest arrays deeper than the stack
        raise ProtocolError("control frame is nested too deeply") from exc
    if not isinstance(message, dict):
        raise ProtocolError("control frame must hold a JSON object")
    return message


def parse_header(header: bytes, max_payload: int) -> tuple[FrameType, int, int]:
    """Check a 12-byte header and return (type, request id, payload length)."""
    magic, version, raw_type, request_id, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    try:
        frame_type = FrameType(raw_type)
    except ValueError as exc:
        raise ProtocolError(f"unknown frame type {raw_type}") from exc
    if length > max_payload:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_payload}")
    return frame_type, request_id, length


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, take whole frames out."""

    def __init__(self, max_payload: int) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._pending: tuple[FrameType, int, int] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` and return every frame it completes; raise ProtocolError on bad bytes."""
        self._buffer += data
        frames: list[Frame] = []
        while True:
            if self._pending is None:
                if len(self._buffer) < HEADER_SIZE:
                    return frames
                self._pending = parse_header(bytes(self._buffer[:HEADER_SIZE]), self._max_payload)
                del self._buffer[:HEADER_SIZE]
            frame_type, request_id, length = self._pending
            if len(self._buffer) < length:
                return frames
            payload = bytes(self._buffer[:length])
            del self._buffer[:length]
            self._pending = None
            frames.append(Frame(frame_type, request_id, payload))

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buffer)
