"""Reading the SNI out of hand-built TLS ClientHello records."""

from __future__ import annotations

import struct

import pytest

from fission.net.sni import NotTLS, record_length, server_name


def vector(size: int, data: bytes) -> bytes:
    return len(data).to_bytes(size, "big") + data


def client_hello(name: str | None, extra_extensions: bytes = b"") -> bytes:
    """A minimal TLS 1.2-style ClientHello record naming ``name`` (or no SNI)."""
    body = b"\x03\x03" + bytes(32) + vector(1, b"") + vector(2, b"\x13\x01") + vector(1, b"\x00")
    extensions = extra_extensions
    if name is not None:
        entry = b"\x00" + vector(2, name.encode())
        extensions += struct.pack(">H", 0) + vector(2, vector(2, entry))
    body += vector(2, extensions)
    handshake = b"\x01" + vector(3, body)
    return b"\x16\x03\x01" + vector(2, handshake)


def test_sni_is_read() -> None:
    record = client_hello("API.example.com.")
    assert record_length(record[:5]) == len(record)
    assert server_name(record) == "api.example.com"


def test_sni_after_other_extensions() -> None:
    other = struct.pack(">H", 0x000A) + vector(2, b"\x00\x02\x00\x1d")
    assert server_name(client_hello("a.org", other)) == "a.org"


def test_no_sni() -> None:
    assert server_name(client_hello(None)) is None


def test_plain_bytes_are_not_tls() -> None:
    assert record_length(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(NotTLS):
        server_name(b"GET / HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize("cut", [6, 20, 50, -1])
def test_truncated_hello_is_refused(cut: int) -> None:
    record = client_hello("a.org")
    cut = cut % len(record)
    damaged = record[:3] + struct.pack(">H", cut - 5) + record[5:cut]
    with pytest.raises(NotTLS):
        server_name(damaged)


def test_lying_lengths_are_refused() -> None:
    record = bytearray(client_hello("a.org"))
    record[-6] = 0x40  # the host name's length, now past the end
    with pytest.raises(NotTLS):
        server_name(bytes(record))
