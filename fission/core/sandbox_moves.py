"""Moving a paused sandbox between hosts: its files out of one manager, into another.

A paused sandbox is a directory (saved state, disk, integrity record) and a catalog row.
``export_paused`` packs both (the directory as an uncompressed tar: the disk is qcow2, already
sparse); ``import_paused`` unpacks them under another manager's sandboxes dir, points the row's
paths there and takes the sandbox in as a restart would (``sandbox_restore``), still paused:
its next resume verifies the integrity record, so a file changed on the way is refused.
``forget_moved`` drops the source's copy once the target has it. Which hosts, and how the bytes
travel, is the fleet's business (``fission.fleet``).
"""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from fission.core import sandbox_restore
from fission.core.catalog import CatalogEntry, entry_for
from fission.core.sandbox_spec import SandboxState
from fission.core.sandboxes import SandboxManager
from fission.errors import Conflict, SandboxNotRunning


def _pack(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def _unpack(blob: bytes, directory: Path) -> None:
    directory.mkdir(mode=0o700)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(directory, filter="data")  # no links out, no absolute paths


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` (JSON) with every path under ``old`` put under ``new``."""
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    if isinstance(value, dict):
        return {key: _moved(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, old, new) for item in value]
    return value


async def export_paused(manager: SandboxManager, sandbox_id: str) -> tuple[CatalogEntry, bytes]:
    """The catalog row and packed files of a paused sandbox (SandboxNotRunning otherwise)."""
    box = manager._box(sandbox_id, None)
    if box.record.state != SandboxState.PAUSED:
        raise SandboxNotRunning(
            f"sandbox {sandbox_id} is {box.record.state.value}: only a paused sandbox can move"
        )
    entry = entry_for(box.record, box.directory, box.reserved_mb, box.config, None)
    return entry, await asyncio.to_thread(_pack, box.directory)


async def import_paused(manager: SandboxManager, entry: CatalogEntry, blob: bytes) -> None:
    """Take in a paused sandbox another host exported (Conflict if one by that id is here)."""
    if entry.id in manager._sandboxes:
        raise Conflict(f"sandbox {entry.id} is already on this host")
    directory = manager.journal.sandboxes_dir / entry.id
    await asyncio.to_thread(_unpack, blob, directory)
    old = entry.directory
    moved = replace(
        entry,
        directory=str(directory),
        vm_config=_moved(entry.vm_config, old, str(directory)),
        workdir=_moved(entry.workdir, old, str(directory)),
    )
    try:
        counts = await sandbox_restore.restore(manager, [moved])
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    if counts.get("paused") != 1:
        raise Conflict(f"sandbox {entry.id} could not be taken in: {counts}")


async def forget_moved(manager: SandboxManager, sandbox_id: str) -> None:
    """Drop this host's copy of a sandbox that now lives on another host."""
    await manager.delete(sandbox_id)
