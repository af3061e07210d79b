"""Derived snapshots: a language's warm VM after a set-up step (e.g. packages installed), saved.

Built once per key (``fission install`` uses language + sorted packages + index URL + the base
snapshot): a clone of the language's warm snapshot gets a qcow2 disk of its own on top of the
base's disk, runs the set-up, then its whole state is saved like a paused sandbox. A restore
starts a VM shaped like the clone from that state, with the derived disk under a throwaway
overlay (``snapshot=on``), so the cached disk never changes and every restore starts identical.
Lives under ``cache_dir()/snapshots/derived/<name>-<key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from fission.cache_keys import cache_key
from fission.core import snapshots
from fission.core.machines import Host, Machine, detect_host, start_machine
from fission.core.orchestrator import clone_config, ensure_snapshot
from fission.core.sandbox_vm import DISK_NAME, STATE_NAME, pause_vm
from fission.images.overlay import create_overlay
from fission.images.store import image_set
from fission.vmm.base import VMConfig

T = TypeVar("T")
Setup = Callable[[Machine], Awaitable[tuple[bool, T]]]


def derived_dir() -> Path:
    """Directory holding every derived snapshot."""
    path = snapshots.snapshots_dir() / "derived"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _base(image: str) -> tuple[VMConfig, snapshots.Snapshot, Host]:
    images = image_set(image)
    host = await detect_host(images)
    snapshot = await ensure_snapshot(images, host)
    return clone_config(images, snapshot), snapshot, host


async def derived_key(image: str, *parts: str) -> str:
    """The cache key of a derived snapshot of ``image``'s warm VM set up as ``parts`` say."""
    _, snapshot, _ = await _base(image)
    return cache_key("derived-1", image, snapshot.directory.name, *parts)


def find(name: str, key: str) -> Path | None:
    """The derived snapshot's directory when it is complete, else None."""
    directory = derived_dir() / f"{name}-{key}"
    return directory if (directory / "meta.json").is_file() else None


async def build(name: str, key: str, image: str, setup: Setup[T]) -> tuple[Path | None, T]:
    """Run ``setup`` in a fresh clone, saved if it says so; (directory or None, its value)."""
    config, base, host = await _base(image)
    final = derived_dir() / f"{name}-{key}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        disk = staging / DISK_NAME
        await asyncio.to_thread(create_overlay, config.scratch, disk)
        config = dataclasses.replace(
            config, scratch=disk, scratch_format="qcow2", scratch_writable=True
        )
        machine = await start_machine(config, host)
        try:
            keep, value = await setup(machine)
        except BaseException:
            await machine.destroy()
            raise
        if not keep:
            await machine.destroy()
            return None, value
        await pause_vm(machine, staging)  # destroys the machine
        disk.chmod(0o444)
        meta = {"image": image, "base": str(base.directory)}
        (staging / "meta.json").write_text(json.dumps(meta))
        prune()
        with contextlib.suppress(OSError):  # another process built it meanwhile
            staging.rename(final)
        return final, value
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prune() -> None:
    """Remove derived snapshots whose base snapshot is gone (rebuilt images or agent)."""
    for directory in derived_dir().iterdir():
        try:
            base = Path(json.loads((directory / "meta.json").read_text())["base"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being built, or not ours
        if not base.is_dir():
            shutil.rmtree(directory, ignore_errors=True)


async def restore(directory: Path, image: str) -> Machine:
    """Start a VM from a derived snapshot; its disk writes vanish with it."""
    config, _, host = await _base(image)
    config = dataclasses.replace(
        config,
        scratch=directory / DISK_NAME,
        scratch_format="qcow2",
        scratch_writable=False,
        incoming=directory / STATE_NAME,
    )
    return await start_machine(config, host)
