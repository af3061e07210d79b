"""Empty ext4 disks used as each VM's writable layer; the size of the disk is the disk cap."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from fission.errors import ImageBuildFailed
from fission.images.store import images_dir
from fission.tools import require_tool

SCRATCH_LABEL = "fission-scratch"


def scratch_disk(size_mb: int) -> Path:
    """Return the cached empty ext4 disk of ``size_mb`` MiB, making it on first use.

    The inode tables and journal are written out now, once, so the guest never spends its
    (emulated) CPU initialising them. VMs attach it copy-on-write and never change it.
    """
    path = images_dir() / f"scratch-{size_mb}.ext4"
    if path.is_file():
        return path
    mkfs = require_tool("mkfs.ext4")
    fd, tmp = tempfile.mkstemp(prefix=".scratch-", dir=path.parent)
    os.close(fd)
    try:
        os.truncate(tmp, size_mb * 1024 * 1024)
        proc = subprocess.run(
            [
                mkfs,
                "-q",
                "-F",
                "-L",
                SCRATCH_LABEL,
                "-m",
                "0",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                tmp,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise ImageBuildFailed(
                f"mkfs.ext4 of a {size_mb} MiB scratch disk failed: {proc.stderr.strip()}"
            )
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
