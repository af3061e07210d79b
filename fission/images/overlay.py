"""A sandbox's own writable disk: a qcow2 overlay on a read-only base, so it costs no copy."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fission.errors import VMStartFailed
from fission.tools import require_tool


def create_overlay(base: Path, target: Path, base_format: str = "raw") -> Path:
    """Create ``target``, a qcow2 file whose unwritten blocks read from the disk ``base``."""
    qemu_img = require_tool("qemu-img")
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base)]
    argv.append(str(target))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise VMStartFailed(f"qemu-img did not create {target} within 30 s") from exc
    if proc.returncode != 0:
        target.unlink(missing_ok=True)
        raise VMStartFailed(f"qemu-img could not create {target}: {proc.stderr.strip()}")
    return target
