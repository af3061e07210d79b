"""Reading the server name (SNI) out of a TLS ClientHello, without decrypting anything.

The proxy never terminates TLS; it only reads the first handshake record the client sends after
CONNECT, to check that the name the client asks the server for is the one the CONNECT named.
Every length is checked against what is left, so hostile bytes give ``NotTLS`` or ``None``.
"""

from __future__ import annotations

import struct

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
SNI_EXTENSION = 0x0000
HOST_NAME = 0x00
RECORD_HEADER = 5
MAX_RECORD = 16384 + 2048


class NotTLS(ValueError):
    """The bytes are not a TLS ClientHello this parser understands."""


def record_length(head: bytes) -> int | None:
    """Total length of the TLS record starting ``head`` (its 5-byte header and body), or None.

    None when ``head`` does not start a TLS handshake record (plain bytes through a tunnel).
    """
    if len(head) < RECORD_HEADER or head[0] != HANDSHAKE or head[1] != 0x03:
        return None
    length = struct.unpack(">H", head[3:5])[0]
    if length > MAX_RECORD:
        return None
    return RECORD_HEADER + length


class _Reader:
    """Bounds-checked reads over a bytes buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise NotTLS("truncated ClientHello")
        piece = self.data[self.pos : self.pos + count]
        self.pos += count
        return piece

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> _Reader:
        return _Reader(self.take(self.number(size)))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def server_name(record: bytes) -> str | None:
    """The SNI host name in a whole ClientHello record, or None when it carries none."""
    if record_length(record) is None:
        raise NotTLS("not a TLS handshake record")
    body = _Reader(record[RECORD_HEADER:])
    if body.number(1) != CLIENT_HELLO:
        raise NotTLS("the first handshake message is not a ClientHello")
    hello = _Reader(body.take(body.number(3)))
    hello.take(2 + 32)  # client version, random
    hello.vector(1)  # session id
    hello.vector(2)  # cipher suites
    hello.vector(1)  # compression methods
    if hello.left == 0:
        return None
    extensions = hello.vector(2)
    while extensions.left:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind == SNI_EXTENSION:
            return _first_host_name(data)
    return None


def _first_host_name(extension: _Reader) -> str | None:
    """The first host_name entry of a server_name extension's body."""
    names = extension.vector(2)
    while names.left:
        name_type = names.number(1)
        value = names.vector(2)
        if name_type == HOST_NAME:
            try:
                return value.data.decode("ascii").lower().rstrip(".")
            except UnicodeDecodeError as exc:
                raise NotTLS("the SNI host name is not ASCII") from exc
    return None
