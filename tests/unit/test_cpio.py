"""The newc cpio writer, read back by a strict parser here and by the system's cpio."""

from __future__ import annotations

import shutil
import stat
import subprocess
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fission.images import cpio

NEWC_MAGIC = b"070701"
HEADER_LEN = 110
TRAILER = "TRAILER!!!"


class Member(NamedTuple):
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    data: bytes
    rdev: tuple[int, int]


def parse_newc(archive: bytes) -> list[Member]:
    """Every member up to and including the trailer; fails on any misalignment or overrun."""
    members: list[Member] = []
    offset = 0
    while True:
        assert offset % 4 == 0, f"member at {offset} is not 4-byte aligned"
        assert archive[offset : offset + 6] == NEWC_MAGIC, f"bad magic at {offset}"
        raw = archive[offset + 6 : offset + HEADER_LEN]
        assert len(raw) == 104, "truncated header"
        fields = [int(raw[8 * i : 8 * i + 8], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, _mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_start = offset + HEADER_LEN
        name_bytes = archive[name_start : name_start + namesize]
        assert len(name_bytes) == namesize and name_bytes.endswith(b"\0")
        assert b"\0" not in name_bytes[:-1]
        data_start = name_start + namesize
        assert archive[data_start : data_start + (-data_start % 4)] == b"\0" * (-data_start % 4)
        data_start += -data_start % 4
        data = archive[data_start : data_start + size]
        assert len(data) == size, "data runs past the end"
        end = data_start + size
        assert archive[end : end + (-end % 4)] == b"\0" * (-end % 4)
        name = name_bytes[:-1].decode()
        members.append(Member(name, ino, mode, uid, gid, nlink, data, (rmaj, rmin)))
        offset = end + (-end % 4)
        if name == TRAILER:
            assert offset == len(archive), "bytes after the trailer"
            return members


ENTRIES = [
    cpio.directory("bin"),
    cpio.file("bin/busybox", b"\x7fELF fake", executable=True),
    cpio.file("init", b"#!/bin/sh\nexec /bin/busybox sh\n", executable=True),
    cpio.directory("dev"),
    cpio.char_device("dev/console", 5, 1),
    cpio.file("etc/empty", b""),
    cpio.file("etc/one", b"1"),
    cpio.file("etc/two", b"22"),
    cpio.file("etc/three", b"333"),
    cpio.file("etc/four", b"4444"),
    cpio.file("etc/five", b"55555"),
]
NAMES = [entry.name for entry in ENTRIES]


@pytest.fixture(scope="module")
def archive() -> bytes:
    return cpio.newc_archive(ENTRIES)


def test_members_round_trip(archive: bytes) -> None:
    members = parse_newc(archive)
    assert [m.name for m in members] == [*NAMES, TRAILER]
    assert [m.data for m in members[:-1]] == [entry.data for entry in ENTRIES]


def test_the_trailer_ends_the_archive(archive: bytes) -> None:
    trailer = parse_newc(archive)[-1]
    assert trailer == Member(TRAILER, 0, 0, 0, 0, 1, b"", (0, 0))
    assert len(archive) % 4 == 0


def test_modes_owners_and_inodes(archive: bytes) -> None:
    members = {m.name: m for m in parse_newc(archive)[:-1]}
    assert members["bin"].mode == stat.S_IFDIR | 0o755 and members["bin"].nlink == 2
    assert members["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert members["etc/empty"].mode == stat.S_IFREG | 0o644
    assert members["dev/console"].mode == stat.S_IFCHR | 0o600
    assert members["dev/console"].rdev == (5, 1)
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    inodes = [m.ino for m in members.values()]
    assert 0 not in inodes and len(set(inodes)) == len(inodes)


def test_an_empty_archive_holds_only_the_trailer() -> None:
    assert [m.name for m in parse_newc(cpio.newc_archive([]))] == [TRAILER]


names = st.text(
    st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-./"),
    min_size=1,
    max_size=40,
)


@given(st.lists(st.tuples(names, st.binary(max_size=50), st.booleans()), max_size=6))
def test_any_files_round_trip(files: list[tuple[str, bytes, bool]]) -> None:
    entries = [cpio.file(name, data, executable=exe) for name, data, exe in files]
    members = parse_newc(cpio.newc_archive(entries))
    assert [(m.name, m.data) for m in members[:-1]] == [(n, d) for n, d, _ in files]


def system_cpio(args: list[str], archive: bytes) -> bytes:
    if shutil.which("cpio") is None:
        pytest.skip("the system cpio is not installed, so its reading is not checked")
    done = subprocess.run(
        ["cpio", *args], input=archive, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_system_cpio_lists_every_member(archive: bytes) -> None:
    listing = system_cpio(["-t", "--quiet"], archive).decode().splitlines()
    assert listing == NAMES


def test_system_cpio_sees_modes_and_devices(archive: bytes) -> None:
    lines = system_cpio(["-tv", "--quiet"], archive).decode().splitlines()
    modes = {line.split()[-1]: line.split()[0] for line in lines}
    assert modes["bin"] == "drwxr-xr-x"
    assert modes["bin/busybox"] == "-rwxr-xr-x"
    assert modes["etc/one"] == "-rw-r--r--"
    assert modes["dev/console"] == "crw-------"


@pytest.mark.parametrize(
    "entry", [e for e in ENTRIES if stat.S_ISREG(e.mode)], ids=lambda e: e.name
)
def test_system_cpio_reads_file_contents(archive: bytes, entry: cpio.Entry) -> None:
    assert system_cpio(["-i", "--quiet", "--to-stdout", entry.name], archive) == entry.data
