"""Running image-build commands (with a log, or for their output) and checking busybox is static.

Finding the programs themselves is ``fission.tools.require_tool``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Literal

from fission.errors import ImageBuildFailed

ELF64_HEADER_SIZE = 64


def is_static_elf(data: bytes) -> bool:
    """True when ``data`` is a whole 64-bit ELF executable with no program interpreter (static)."""
    if len(data) < ELF64_HEADER_SIZE or data[:4] != b"\x7fELF" or data[4] != 2:  # ELFCLASS64
        return False
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    if int.from_bytes(data[16:18], order) not in (2, 3):  # ET_EXEC, or ET_DYN for a static PIE
        return False
    return _no_interp(data, order)


def _no_interp(data: bytes, order: Literal["little", "big"]) -> bool:
    """True when every program header is inside ``data`` and none is PT_INTERP."""
    phoff = int.from_bytes(data[32:40], order)
    phentsize = int.from_bytes(data[54:56], order)
    phnum = int.from_bytes(data[56:58], order)
    if phnum == 0 or phentsize < 4:
        return False
    for index in range(phnum):
        start = phoff + index * phentsize
        if start + 4 > len(data):
            return False
        if int.from_bytes(data[start : start + 4], order) == 3:  # PT_INTERP
            return False
    return True


def run_logged(
    argv: list[str], log: Path, *, timeout: float, cwd: Path | None = None, what: str
) -> None:
    """Run a build command with output to ``log``; raise ImageBuildFailed with its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        try:
            proc = subprocess.run(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ImageBuildFailed(f"{what} took longer than {timeout:.0f} s; log: {log}") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ImageBuildFailed(
            f"{what} failed (exit {proc.returncode}); log: {log}\n" + "\n".join(tail)
        )


def capture(argv: list[str], *, timeout: float, what: str) -> str:
    """Run a query command and return its stdout; raise ImageBuildFailed if it fails."""
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildFailed(f"{what} took longer than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise ImageBuildFailed(f"{what} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout
