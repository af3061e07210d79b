"""Files into and out of one-shot runs: bytes in before the program starts, bytes out after.

The Service takes uploads as (guest path, bytes) and returns downloads as bytes keyed by guest
path, so the same call works in-process and through the daemon: host paths never cross the API
(a daemon must not read or write files named by a client). Reading and writing the caller's
own files (``--upload LOCAL:REMOTE``, ``--download REMOTE:LOCAL``) is the client's part
(``fission.sdk._local``). Guest paths are checked by the guest agent (``path_not_allowed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fission.agent.client import AgentClient
from fission.errors import InvalidInput

TRANSFER_TIMEOUT = 300.0
MAX_TRANSFER_FILES = 10000
MAX_TRANSFER_BYTES = 256 * 1024 * 1024  # each way, per run


@dataclass(frozen=True)
class Upload:
    """Bytes written to ``remote`` in the VM before the program starts."""

    remote: str
    data: bytes


def check_transfers(uploads: Sequence[Upload], downloads: Sequence[str]) -> None:
    """Refuse transfers that are malformed or too large, before any VM starts."""
    if len(uploads) > MAX_TRANSFER_FILES or len(downloads) > MAX_TRANSFER_FILES:
        raise InvalidInput(f"a run takes at most {MAX_TRANSFER_FILES} uploads and downloads")
    for remote in [upload.remote for upload in uploads] + list(downloads):
        if not isinstance(remote, str) or not remote or "\0" in remote:
            raise InvalidInput(f"{remote!r} is not a path in the VM")
    total = sum(len(upload.data) for upload in uploads)
    if total > MAX_TRANSFER_BYTES:
        raise InvalidInput(
            f"the uploads hold {total} bytes; a run takes at most {MAX_TRANSFER_BYTES} "
            "(use a sandbox's file API for more)"
        )


async def push(agent: AgentClient, uploads: Sequence[Upload]) -> None:
    """Copy every upload into the VM."""
    for upload in uploads:
        await agent.write_file(upload.remote, upload.data, timeout=TRANSFER_TIMEOUT)


async def pull(agent: AgentClient, downloads: Sequence[str]) -> dict[str, bytes]:
    """The bytes of every download, read out of the VM (at most MAX_TRANSFER_BYTES in all)."""
    files: dict[str, bytes] = {}
    total = 0
    for remote in downloads:
        parts: list[bytes] = []
        chunks = agent.read_file(remote, timeout=TRANSFER_TIMEOUT)
        try:
            async for chunk in chunks:
                total += len(chunk)
                if total > MAX_TRANSFER_BYTES:
                    raise InvalidInput(
                        f"the downloads hold more than {MAX_TRANSFER_BYTES} bytes: "
                        "use a sandbox's file API for more"
                    )
                parts.append(chunk)
        finally:
            await chunks.aclose()
        files[remote] = b"".join(parts)
    return files
