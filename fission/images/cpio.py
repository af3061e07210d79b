"""Writing a newc cpio archive (the initramfs format) in pure Python, no root needed."""

from __future__ import annotations

import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file, or a character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,
        0,
        2 if stat.S_ISDIR(entry.mode) else 1,
        0,
        len(entry.data),
        0,
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,
    )
    header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
    return header + name + _pad(len(header) + len(name)) + entry.data + _pad(len(entry.data))


def newc_archive(entries: list[Entry]) -> bytes:
    """Return a newc cpio archive holding ``entries`` (all owned by root), with its trailer."""
    parts = [_member(index + 1, entry) for index, entry in enumerate(entries)]
    parts.append(_member(0, Entry("TRAILER!!!", 0)))
    return b"".join(parts)


def directory(name: str) -> Entry:
    """A directory entry, mode 0755."""
    return Entry(name, stat.S_IFDIR | 0o755)


def file(name: str, data: bytes, executable: bool = False) -> Entry:
    """A regular file entry."""
    return Entry(name, stat.S_IFREG | (0o755 if executable else 0o644), data)


def char_device(name: str, major: int, minor: int) -> Entry:
    """A character device node (e.g. /dev/console), mode 0600."""
    return Entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))
