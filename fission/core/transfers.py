"""Files into and out of one-shot runs: ``--upload LOCAL:REMOTE`` and ``--download REMOTE:LOCAL``.

Uploads go in through the agent's file operations before the program starts (copied, never
mounted). A download writes only the local path it names: into a temporary file beside it, then
renamed over it, so a symlink there is replaced rather than followed and a failed transfer
leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fission.agent.client import AgentClient
from fission.errors import InvalidInput

TRANSFER_TIMEOUT = 300.0


@dataclass(frozen=True)
class Upload:
    """A host file copied into the VM."""

    local: Path
    remote: str


@dataclass(frozen=True)
class Download:
    """A VM file copied out to exactly one host path."""

    remote: str
    local: Path


def parse_upload(text: str) -> Upload:
    """``LOCAL:REMOTE`` (split at the last colon); InvalidInput when malformed."""
    local, sep, remote = text.rpartition(":")
    if not sep or not local or not remote:
        raise InvalidInput(f"--upload {text!r}: expected LOCAL:REMOTE")
    path = Path(local)
    if not path.is_file():
        raise InvalidInput(f"--upload {text!r}: {local} is not a file")
    return Upload(path, remote)


def parse_download(text: str) -> Download:
    """``REMOTE:LOCAL`` (split at the first colon); InvalidInput when malformed."""
    remote, sep, local = text.partition(":")
    if not sep or not local or not remote:
        raise InvalidInput(f"--download {text!r}: expected REMOTE:LOCAL")
    path = Path(local)
    if path.is_dir():
        raise InvalidInput(f"--download {text!r}: {local} is a directory; name the file")
    if not path.absolute().parent.is_dir():
        raise InvalidInput(f"--download {text!r}: {path.parent} is not a directory")
    return Download(remote, path)


async def push(agent: AgentClient, uploads: tuple[Upload, ...]) -> None:
    """Copy every upload into the VM."""
    for upload in uploads:
        data = upload.local.read_bytes()
        await agent.write_file(upload.remote, data, timeout=TRANSFER_TIMEOUT)


async def pull(agent: AgentClient, downloads: tuple[Download, ...]) -> None:
    """Copy every download out of the VM, each only to its own local path."""
    for download in downloads:
        target = download.local.absolute()
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                chunks = agent.read_file(download.remote, timeout=TRANSFER_TIMEOUT)
                try:
                    async for chunk in chunks:
                        out.write(chunk)
                finally:
                    await chunks.aclose()
            os.chmod(temp, 0o644)
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
