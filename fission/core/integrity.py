"""Checksums of saved VMs: taken when a state is saved, checked before anything restores it.

A pause and a snapshot record the size and SHA-256 of each file they leave (the VM ``state``
and its disk) in ``integrity.json`` next to them; resume, create-from-snapshot and rewind
check the files first and refuse a changed or truncated one with ``IntegrityError``, before
any VM starts, so nothing else is touched. SHA-256 rather than BLAKE2b: on this host (SHA-NI)
``hashlib.file_digest`` hashes 300 MB in 0.21 s against 0.36 s for BLAKE2b.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fission.errors import IntegrityError

ALGORITHM = "sha256"
RECORD_NAME = "integrity.json"


def file_digest(path: Path) -> str:
    """The hex SHA-256 of ``path``'s bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def measure(directory: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Size and digest of each of ``names`` in ``directory``."""
    return {
        name: {"size": (directory / name).stat().st_size, ALGORITHM: file_digest(directory / name)}
        for name in names
    }


def seal(directory: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Record the checksums of ``names`` in ``directory/integrity.json`` (written atomically)."""
    sums = measure(directory, names)
    write_json_atomic(directory / RECORD_NAME, sums)
    return sums


def verify(directory: Path, sums: dict[str, dict[str, Any]] | None = None, what: str = "") -> None:
    """Check the files against ``sums`` (default: the sealed record); IntegrityError if any
    is missing, truncated or changed."""
    label = what or str(directory)
    if sums is None:
        try:
            sums = json.loads((directory / RECORD_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"{label}: its checksum record is missing or unreadable ({exc}); the saved "
                "state cannot be trusted: delete it"
            ) from exc
    if not isinstance(sums, dict) or not sums:
        raise IntegrityError(f"{label}: its checksum record is empty; delete it")
    for name, expected in sums.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise IntegrityError(f"{label}: {name} is missing ({exc}); delete it") from exc
        if size != expected.get("size"):
            raise IntegrityError(
                f"{label}: {name} is {size} bytes, {expected.get('size')} were saved "
                "(truncated or changed): it cannot be restored; delete it"
            )
        if file_digest(path) != expected.get(ALGORITHM):
            raise IntegrityError(
                f"{label}: {name} no longer matches the {ALGORITHM} taken when it was saved "
                "(corrupted or tampered with): it cannot be restored; delete it"
            )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so a reader sees the old file or the new, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
