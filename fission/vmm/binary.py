"""The QEMU binary: where it is and which version it is (shared by the driver and the jail)."""

from __future__ import annotations

import functools
import os
import re
import subprocess

from fission.errors import MissingTool
from fission.tools import require_tool


def qemu_binary() -> str:
    """Path of qemu-system-x86_64 (``FISSION_QEMU`` overrides), or MissingTool naming it."""
    override = os.environ.get("FISSION_QEMU")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise MissingTool(
                f"FISSION_QEMU={override} is not an executable file: point it at "
                "qemu-system-x86_64 or unset it"
            )
        return override
    return require_tool("qemu-system-x86_64")


@functools.cache
def qemu_version(qemu: str) -> str:
    """The version QEMU reports, e.g. ``7.2.19`` (asked once per binary and process)."""
    try:
        out = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingTool(f"{qemu} does not run: {exc}") from exc
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()
