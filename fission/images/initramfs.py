"""The initramfs: static busybox, the virtio modules and the /init that hands over to the agent."""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fission.cache_keys import cache_key
from fission.errors import MissingTool
from fission.images import cpio
from fission.images.recipes import KERNEL_MODULES
from fission.images.store import images_dir
from fission.images.tools import is_static_elf
from fission.tools import require_tool

DIRECTORIES = ("bin", "dev", "proc", "sys", "mnt", "newroot", "lib", "lib/modules")


def init_script() -> bytes:
    """The initramfs /init shipped with this fission."""
    return resources.files("fission.images").joinpath("init.sh").read_bytes()


def static_busybox() -> bytes:
    """The host's busybox binary, which must be statically linked (Debian's busybox-static)."""
    path = Path(require_tool("busybox")).resolve()
    data = path.read_bytes()
    if not is_static_elf(data):
        raise MissingTool(
            f"{path} is dynamically linked: install 'busybox-static' "
            "(apt-get install busybox-static)"
        )
    return data


def initramfs_entries(busybox: bytes, init: bytes, modules: dict[str, bytes]) -> list[cpio.Entry]:
    """Every member of the initramfs, in archive order."""
    entries = [cpio.directory(name) for name in DIRECTORIES]
    entries.append(cpio.char_device("dev/console", 5, 1))
    entries.append(cpio.file("bin/busybox", busybox, executable=True))
    entries.append(cpio.file("init", init, executable=True))
    entries.extend(cpio.file(f"lib/modules/{name}", data) for name, data in modules.items())
    return entries


def build_initramfs(kernel: dict[str, Any]) -> dict[str, Any]:
    """Write the initramfs for ``kernel`` unless cached; return its manifest entry."""
    busybox, init = static_busybox(), init_script()
    module_dir = Path(kernel["modules"])
    modules = {Path(m).name: (module_dir / Path(m).name).read_bytes() for m in KERNEL_MODULES}
    key = cache_key(kernel["key"], init, busybox)
    path = images_dir() / f"initramfs-{key}.cpio.gz"
    if not path.is_file():
        archive = cpio.newc_archive(initramfs_entries(busybox, init, modules))
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
        os.replace(tmp, path)
    return {"key": key, "path": str(path)}
