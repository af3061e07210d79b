"""The caller's own files: read in chunks, write to a temporary name and rename into place."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fission.core.transfers import MAX_TRANSFER_BYTES, MAX_TRANSFER_FILES, Upload
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


# -- the caller's files for one-shot runs (``--upload``, ``--download``, ``fission repo DIR``) --


@dataclass(frozen=True)
class LocalDownload:
    """A guest file to copy out after a run, to exactly one local path."""

    remote: str
    local: Path


def parse_upload(text: str) -> Upload:
    """``LOCAL:REMOTE`` (split at the last colon), read now; InvalidInput when malformed."""
    local, sep, remote = text.rpartition(":")
    if not sep or not local or not remote:
        raise InvalidInput(f"--upload {text!r}: expected LOCAL:REMOTE")
    path = Path(local)
    if not path.is_file():
        raise InvalidInput(f"--upload {text!r}: {local} is not a file")
    try:
        return Upload(remote, path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"--upload {text!r}: cannot read {local}: {exc.strerror}") from exc


def parse_download(text: str) -> LocalDownload:
    """``REMOTE:LOCAL`` (split at the first colon); InvalidInput when malformed."""
    remote, sep, local = text.partition(":")
    if not sep or not local or not remote:
        raise InvalidInput(f"--download {text!r}: expected REMOTE:LOCAL")
    path = Path(local)
    if path.is_dir():
        raise InvalidInput(f"--download {text!r}: {local} is a directory; name the file")
    if not path.absolute().parent.is_dir():
        raise InvalidInput(f"--download {text!r}: {path.parent} is not a directory")
    return LocalDownload(remote, path)


def save_downloads(downloads: Sequence[LocalDownload], files: Mapping[str, bytes]) -> None:
    """Write each downloaded file to its own local path (temporary file, then rename)."""
    for download in downloads:
        if download.remote not in files:
            continue  # the run was cut off before its files were read (a wedged guest)
        with atomic_target(download.local) as handle:
            handle.write(files[download.remote])


def directory_uploads(source: Path, workdir: str) -> tuple[Upload, ...]:
    """Every regular file under ``source`` as an upload into ``workdir``; symlinks are skipped."""
    uploads: list[Upload] = []
    total = 0
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        total += path.stat().st_size
        if len(uploads) >= MAX_TRANSFER_FILES or total > MAX_TRANSFER_BYTES:
            raise InvalidInput(
                f"{source} holds more than {MAX_TRANSFER_FILES} files or "
                f"{MAX_TRANSFER_BYTES // (1024 * 1024)} MB: clone it from a URL instead"
            )
        remote = f"{workdir}/{path.relative_to(source).as_posix()}"
        uploads.append(Upload(remote, path.read_bytes()))
    return tuple(uploads)
