"""is_static_elf: real binaries, hand-made ELF headers, and bytes that are not ELF at all."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from fission.images.tools import is_static_elf

PT_LOAD, PT_INTERP, PT_DYNAMIC = 1, 3, 2
EHDR_SIZE, PHDR_SIZE = 64, 56


def elf(segments: list[int], *, order: str = "<", elf_class: int = 2) -> bytes:
    """A minimal 64-bit ELF executable whose program headers have the given types."""
    endian = 1 if order == "<" else 2
    ident = b"\x7fELF" + bytes([elf_class, endian, 1]) + bytes(9)
    header = ident + struct.pack(
        order + "HHIQQQIHHHHHH",
        2,
        62,
        1,
        0x401000,
        EHDR_SIZE,
        0,
        0,
        EHDR_SIZE,
        PHDR_SIZE,
        len(segments),
        64,
        0,
        0,
    )
    assert len(header) == EHDR_SIZE
    phdrs = b"".join(
        struct.pack(order + "IIQQQQQQ", kind, 5, 0, 0, 0, 0, 0, 0x1000) for kind in segments
    )
    return header + phdrs


def test_a_hand_made_static_executable() -> None:
    assert is_static_elf(elf([PT_LOAD]))
    assert is_static_elf(elf([PT_LOAD, PT_LOAD]))


@pytest.mark.parametrize(
    "segments", [[PT_INTERP], [PT_LOAD, PT_INTERP], [PT_LOAD, PT_DYNAMIC, PT_INTERP]]
)
def test_a_program_interpreter_means_dynamic(segments: list[int]) -> None:
    assert not is_static_elf(elf(segments))


def test_big_endian_headers_are_read_big_endian() -> None:
    assert is_static_elf(elf([PT_LOAD], order=">"))
    assert not is_static_elf(elf([PT_LOAD, PT_INTERP], order=">"))


def test_32_bit_elf_is_refused() -> None:
    assert not is_static_elf(elf([PT_LOAD], elf_class=1))


def test_the_host_busybox_is_static() -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("/bin/busybox is not installed")
    assert is_static_elf(busybox.read_bytes())


@pytest.mark.parametrize("path", ["/bin/ls", "/bin/sh", "/usr/bin/env"])
def test_host_dynamic_binaries_are_not_static(path: str) -> None:
    binary = Path(path).resolve()
    if not binary.exists():
        pytest.skip(f"{path} is not on this host")
    data = binary.read_bytes()
    if b"ld-linux" not in data and b"ld-musl" not in data:
        pytest.skip(f"{path} is statically linked on this host")
    assert not is_static_elf(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x7f",
        b"\x7fEL",
        b"#!/bin/sh\necho hi\n",
        b"MZ" + bytes(100),
        b"\x7fELG" + bytes(100),
        b"\x00ELF" + bytes(100),
    ],
)
def test_non_elf_bytes_are_not_static(data: bytes) -> None:
    assert not is_static_elf(data)


@pytest.mark.parametrize(
    "length",
    [4, 5, 6, 16, 40, 56, 57, 63, 64, 64 + PHDR_SIZE, 64 + PHDR_SIZE + 3],
)
def test_a_truncated_dynamic_executable_is_not_static(length: int) -> None:
    # The full file names an interpreter; no prefix of it may be taken for a static binary.
    data = elf([PT_LOAD, PT_INTERP])
    assert length < len(data)
    assert is_static_elf(data[:length]) is False


def test_a_program_header_table_past_the_end_is_not_static() -> None:
    data = bytearray(elf([PT_LOAD]))
    data[32:40] = (10**6).to_bytes(8, "little")  # e_phoff far beyond the file
    assert not is_static_elf(bytes(data))
    assert not is_static_elf(b"\x7fELF\x02\x01" + b"\xff" * 60)
