"""Moving file contents through MCP: inline (text or base64, capped) and via the host's files.

Inline content travels inside JSON-RPC messages, so it is capped (``MAX_INLINE_BYTES`` each
way). Larger files move between the sandbox and a directory on the MCP server's host that the
operator named with ``--allow-host-files DIR``; ``HostFiles`` confines every host path to it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from fission.errors import FileNotFound, InvalidInput, PathNotAllowed

MAX_INLINE_BYTES = 1024 * 1024
CHUNK_BYTES = 1024 * 1024
Encoding = Literal["utf-8", "base64"]


def decode_content(content: str, encoding: Encoding) -> bytes:
    """The bytes ``content`` stands for; InvalidInput for bad base64 or more than the cap."""
    if encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"content is not valid base64: {exc}") from exc
    else:
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"content is not valid UTF-8 text: {exc.reason}") from exc
    if len(data) > MAX_INLINE_BYTES:
        raise InvalidInput(
            f"content is {len(data)} bytes; one call writes at most {MAX_INLINE_BYTES}: "
            "write it in parts and join them with sandbox_exec, or use sandbox_upload"
        )
    return data


def encode_content(data: bytes, encoding: Encoding, truncated: bool) -> str:
    """``data`` as text in ``encoding``; a UTF-8 character cut by truncation is dropped."""
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(data, final=not truncated)
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"the file is not UTF-8 text (byte {exc.start} cannot be decoded): "
            "read it with encoding='base64'"
        ) from exc


async def read_capped(chunks: AsyncIterator[bytes], cap: int) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of ``chunks`` and whether there was more; stops reading at the cap."""
    parts: list[bytes] = []
    size = 0
    truncated = False
    try:
        async for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size > cap:
                truncated = True
                break
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    return b"".join(parts)[:cap], truncated


@dataclass(frozen=True)
class Transferred:
    """What one host transfer moved."""

    size: int
    sha256: str


class HostReader:
    """An open host file read in chunks, counting and hashing what it reads."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.size = 0
        self.digest = hashlib.sha256()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's chunks, until its end; the file is closed afterwards."""
        with self.handle:
            while chunk := await asyncio.to_thread(self.handle.read, CHUNK_BYTES):
                self.size += len(chunk)
                self.digest.update(chunk)
                yield chunk

    def close(self) -> None:
        """Close the file (safe after ``chunks`` closed it)."""
        self.handle.close()


class HostFiles:
    """Files on the MCP server's host, confined to one directory the operator chose."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise InvalidInput(f"--allow-host-files {root}: no such directory")
        self.root = root.resolve()

    def resolve(self, path: str) -> Path:
        """The host path ``path`` names (relative to the root), if it stays inside the root."""
        if not path or "\0" in path:
            raise InvalidInput("the host path is empty or holds a NUL byte")
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root) or target == self.root:
            raise PathNotAllowed(
                f"host path {path!r} is outside {self.root}, the only host directory this "
                "server may use (set by --allow-host-files)"
            )
        return target

    def open(self, path: str) -> HostReader:
        """A reader of the host file ``path`` (opened now, so a missing file fails early)."""
        source = self.resolve(path)
        try:
            return HostReader(source.open("rb"))
        except FileNotFoundError as exc:
            raise FileNotFound(f"no file {path!r} in {self.root} on the host") from exc
        except IsADirectoryError as exc:
            raise InvalidInput(f"host path {path!r} is a directory") from exc

    async def write(self, path: str, chunks: AsyncIterator[bytes]) -> Transferred:
        """Write ``chunks`` to a host file atomically (a temporary file, then a rename)."""
        target = self.resolve(path)
        if not target.parent.is_dir():
            raise FileNotFound(f"host directory {target.parent} does not exist")
        if target.is_dir():
            raise InvalidInput(f"host path {path!r} is a directory")
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(handle.write, chunk)
            # os.replace swaps a symlink at ``target`` itself, never the file it points to.
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return Transferred(size, digest.hexdigest())
