"""Local files for transfers: read in chunks, write to a temporary name and rename into place."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fission.errors import InvalidInput
from fission.sdk._requests import CHUNK_SIZE

FileData = bytes | bytearray | memoryview | str | BinaryIO


def read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    """The rest of an open binary file, CHUNK_SIZE bytes at a time."""
    while chunk := handle.read(CHUNK_SIZE):
        if not isinstance(chunk, bytes | bytearray):
            raise InvalidInput("the file object must be opened in binary mode ('rb')")
        yield bytes(chunk)


async def aread_chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    """Like ``read_chunks``, reading in a worker thread so the event loop keeps running."""
    while chunk := await asyncio.to_thread(handle.read, CHUNK_SIZE):
        if not isinstance(chunk, bytes | bytearray):
            raise InvalidInput("the file object must be opened in binary mode ('rb')")
        yield bytes(chunk)


def body_of(data: FileData) -> bytes | Iterator[bytes]:
    """What to send for ``data``: its bytes, or a file object's chunks as they are read."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return read_chunks(data)


def abody_of(data: FileData) -> bytes | AsyncIterator[bytes]:
    """Like ``body_of``, reading a file object in a worker thread."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return aread_chunks(data)


def open_source(local_path: str | os.PathLike[str]) -> BinaryIO:
    """A local file to upload, opened for reading; InvalidInput when it cannot be."""
    try:
        return open(local_path, "rb")  # the caller closes it
    except OSError as exc:
        raise InvalidInput(f"cannot read {local_path}: {exc.strerror}") from exc


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else the usual 022."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextmanager
def atomic_target(local_path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file next to ``local_path`` to write; renamed over it if the block succeeds.

    On failure the temporary file is removed and ``local_path`` is left as it was.
    """
    target = Path(local_path)
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise InvalidInput(f"cannot write next to {target}: {exc.strerror}") from exc
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
