"""Derived snapshots: a language's warm VM after a set-up step (e.g. packages installed), saved.

Built once per key (``fission install`` uses language + sorted packages + index URL + the base
template): a clone of the language's warm template gets a disk of its own on top of the
template's disk, runs the set-up, then its whole state is saved like a paused sandbox. A restore
starts a VM shaped like the clone from that state, with the derived disk under a throwaway
overlay, so the cached disk never changes and every restore starts identical. Lives under
``cache_dir()/snapshots/derived/<name>-<key>``.
"""

from __future__ import annotations

import contextlib
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
from fission.vmm.base import DISK_NAME, Driver, Machine, VMConfig, VMRequest, default_driver

T = TypeVar("T")
Setup = Callable[[Machine], Awaitable[tuple[bool, T]]]
# Derived snapshots being restored in this process: the snapshot budget never evicts these.
_restoring: Counter[Path] = Counter()


def in_use(directory: Path) -> bool:
    """Whether this process is restoring the derived snapshot in ``directory``."""
    return _restoring[directory] > 0


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
