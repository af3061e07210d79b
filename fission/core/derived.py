"""Derived snapshots: a language's warm VM after a set-up step (e.g. packages installed), saved.

Built once per key (``fission install`` uses language + sorted packages + index URL + the base
template): a clone of the language's warm template gets a disk of its own on top of the
template's disk, runs the set-up, then its whole state is saved like a paused sandbox. A restore
starts a VM shaped like the clone from that state, with the derived disk under a throwaway
overlay, so the cached disk never changes and every restore starts identical. Lives under
``cache_dir()/snapshots/derived/<name>-<key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from fission.config import cache_dir
from fission.core import snapshots
from fission.core.sandbox_vm import pause_vm
from fission.images.recipes import cache_key
from fission.vmm.base import (
    DISK_NAME,
    STATE_NAME,
    Driver,
    Machine,
    VMConfig,
    VMRequest,
    default_driver,
)

T = TypeVar("T")
Setup = Callable[[Machine], Awaitable[tuple[bool, T]]]
# Derived snapshots being restored in this process: the snapshot budget never evicts these.
_restoring: Counter[Path] = Counter()


# Named derived snapshots (templates: ``template_build``) go only when their owner removes them,
# never to the snapshot budget: sandboxes' disks may be layered on them.
NAMED_PREFIX = "template-"


def in_use(directory: Path) -> bool:
    """Whether the budget must keep the derived snapshot in ``directory``: this process is
    restoring it, or it is a template's."""
    return _restoring[directory] > 0 or directory.name.startswith(NAMED_PREFIX)


def derived_dir() -> Path:
    """Directory holding every derived snapshot."""
    path = cache_dir() / "snapshots" / "derived"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clone(image: str, disk_dir: Path | None = None) -> VMRequest:
    return VMRequest.clone(image, snapshots.warm_template(image), disk_dir)


async def derived_key(image: str, *parts: str, driver: Driver | None = None) -> str:
    """The cache key of a derived snapshot of ``image``'s warm VM set up as ``parts`` say."""
    driver = driver or default_driver()
    config = await driver.configure(_clone(image))
    base = config.template.name if config.template is not None else driver.name
    return cache_key("derived-1", image, base, *parts)


def find(name: str, key: str) -> Path | None:
    """The derived snapshot's directory when it is complete, else None."""
    directory = derived_dir() / f"{name}-{key}"
    return directory if (directory / "meta.json").is_file() else None


async def build(
    name: str, key: str, image: str, setup: Setup[T], driver: Driver | None = None
) -> tuple[Path | None, T]:
    """Run ``setup`` in a fresh clone, saved if it says so; (directory or None, its value)."""
    driver = driver or default_driver()
    final = derived_dir() / f"{name}-{key}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        config = await driver.configure(_clone(image, staging))
        machine = await driver.start(config)
        try:
            keep, value = await setup(machine)
        except BaseException:
            await machine.destroy()
            raise
        if not keep:
            await machine.destroy()
            return None, value
        await pause_vm(machine, staging)  # destroys the machine
        (staging / DISK_NAME).chmod(0o444)
        base = str(config.template) if config.template is not None else ""
        (staging / "meta.json").write_text(json.dumps({"image": image, "base": base}))
        prune()
        with contextlib.suppress(OSError):  # another process built it meanwhile
            staging.rename(final)
        return final, value
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prune() -> None:
    """Remove derived snapshots whose base template is gone (rebuilt images or agent)."""
    for directory in derived_dir().iterdir():
        try:
            base = json.loads((directory / "meta.json").read_text())["base"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being built, or not ours
        if isinstance(base, str) and base and not Path(base).is_dir():
            shutil.rmtree(directory, ignore_errors=True)


async def restore(directory: Path, image: str, driver: Driver | None = None) -> Machine:
    """Start a VM from a derived snapshot; its disk writes vanish with it."""
    driver = driver or default_driver()
    _restoring[directory] += 1
    try:
        with contextlib.suppress(OSError):  # last used, for the snapshot budget's LRU
            os.utime(directory / "meta.json")
        config: VMConfig = await driver.configure(_clone(image))
        return await driver.start(driver.restored(config, directory, keep_writes=False))
    finally:
        _restoring[directory] -= 1


async def restore_into(
    source: Path, image: str, directory: Path, driver: Driver, *, detached: bool = False
) -> tuple[Machine, VMConfig]:
    """Start a VM from the derived snapshot in ``source`` whose writes go to a disk of its own
    in ``directory`` (a sandbox's); the cached disk is its read-only backing file."""
    _restoring[source] += 1
    disk = directory / DISK_NAME
    try:
        clone = await driver.configure(_clone(image))
        await asyncio.to_thread(driver.layer_disk, source / DISK_NAME, disk)
        config = dataclasses.replace(
            driver.restored(clone, directory, keep_writes=True),
            incoming=source / STATE_NAME,
            detached=detached,
        )
        return await driver.start(config), config
    except BaseException:
        disk.unlink(missing_ok=True)
        raise
    finally:
        _restoring[source] -= 1
