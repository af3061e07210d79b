"""Where sandbox snapshots live: one directory each, a manifest, a disk budget, LRU eviction.

Each snapshot is ``<state>/snapshots/<id>/`` holding ``state`` (the VM's saved state),
``disk.qcow2`` (a copy of the sandbox's disk overlay, read-only), ``integrity.json`` (their
checksums) and ``manifest.json`` (who owns it, what it came from, the VM config to restore it
with), written atomically last: a directory without a manifest is a save that never finished,
and ``gc`` removes it. Nothing else is needed to list a snapshot after a daemon restart.

A snapshot is *in use* while something needs its files: a create, fork or rewind restoring it
(``pin``), a disk whose qcow2 backing file is its disk (a sandbox started from it, or a later
snapshot of such a sandbox), or, for a checkpoint, being the latest of a sandbox that still
exists. Deleting one in use is refused; eviction and ``gc`` skip it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fission.core import integrity
from fission.core.sandbox_spec import SandboxSpec, spec_from_json, spec_to_json
from fission.errors import Conflict, InvalidInput, SnapshotNotFound
from fission.vmm.base import DISK_NAME, STATE_NAME, VMConfig, config_from_json, config_to_json
from fission.vmm.jailer import qcow2_backing

MANIFEST = "manifest.json"
ID_PREFIX = "snap_"
KINDS = ("snapshot", "checkpoint", "fork")
MAX_NAME = 128
MB = 1024 * 1024


def check_name(name: str | None) -> str | None:
    """A snapshot name: None, or 1 to 128 printable characters."""
    if name is None:
        return None
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise InvalidInput(f"a snapshot name must be 1 to {MAX_NAME} printable characters")
    return name


@dataclass
class SnapshotRecord:
    """One saved sandbox: its facts, and the config of the VM that restores it."""

    id: str
    owner: str | None
    kind: str
    sandbox_id: str
    spec: SandboxSpec
    config: VMConfig
    created_at: float
    name: str | None = None
    size_bytes: int = 0
    last_used_at: float = 0.0
    checksums: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, as the APIs return it."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "sandbox_id": self.sandbox_id,
            "language": self.spec.language.name,
            "limits": self.spec.limits.to_json(),
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }

    def manifest(self) -> dict[str, Any]:
        """Everything the manifest file keeps."""
        return self.to_json() | {
            "owner": self.owner,
            "spec": spec_to_json(self.spec),
            "config": config_to_json(self.config),
            "checksums": self.checksums,
        }

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> SnapshotRecord:
        """The record a manifest file holds."""
        return cls(
            id=data["id"],
            owner=data["owner"],
            kind=data["kind"],
            sandbox_id=data["sandbox_id"],
            spec=spec_from_json(data["spec"]),
            config=config_from_json(data["config"]),
            created_at=data["created_at"],
            name=data.get("name"),
            size_bytes=data.get("size_bytes", 0),
            last_used_at=data.get("last_used_at", data["created_at"]),
            checksums=data.get("checksums", {}),
        )


def disk_usage(path: Path) -> int:
    """Bytes a file or tree takes on disk (allocated blocks: sparse files count what they use)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


class SnapshotStore:
    """Every sandbox snapshot of one daemon, on disk under ``root``; ``budget_mb`` bounds them."""

    def __init__(self, root: Path, budget_mb: int | None = None) -> None:
        self.root = root
        self.budget_mb = budget_mb
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._records: dict[str, SnapshotRecord] = {}
        self._pins: Counter[str] = Counter()
        self._staging: set[str] = set()  # being saved: not listed, not leftovers either
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            try:
                record = SnapshotRecord.from_manifest(json.loads(manifest.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: gc reports and removes it
            self._records[record.id] = record

    # -- reading --------------------------------------------------------------------------------
    def directory(self, snapshot_id: str) -> Path:
        """The directory of snapshot ``snapshot_id``."""
        return self.root / snapshot_id

    def get(self, snapshot_id: str, owner: str | None = None) -> SnapshotRecord:
        """The snapshot; SnapshotNotFound if there is none or it is not ``owner``'s."""
        record = self._records.get(snapshot_id)
        if record is None or (owner is not None and record.owner != owner):
            raise SnapshotNotFound(
                f"no snapshot {snapshot_id!r}: it was deleted, evicted, or never existed"
            )
        return record

    def find(
        self, owner: str | None = None, sandbox_id: str | None = None, kind: str | None = None
    ) -> list[SnapshotRecord]:
        """Snapshots matching the filters, oldest first."""
        found = [
            r
            for r in self._records.values()
            if (owner is None or r.owner == owner)
            and (sandbox_id is None or r.sandbox_id == sandbox_id)
            and (kind is None or r.kind == kind)
        ]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    def used_bytes(self, owner: str | None = None) -> int:
        """Bytes the snapshots of ``owner`` (None: everyone) take."""
        return sum(r.size_bytes for r in self.find(owner))

    # -- writing --------------------------------------------------------------------------------
    def staging(self) -> tuple[str, Path]:
        """A fresh id and the directory to save it in (not listed until ``add``)."""
        snapshot_id = ID_PREFIX + secrets.token_hex(8)
        path = self.directory(snapshot_id)
        path.mkdir(mode=0o700)
        self._staging.add(snapshot_id)
        return snapshot_id, path

    def add(self, record: SnapshotRecord) -> SnapshotRecord:
        """Seal the saved files of ``record`` (checksums, read-only) and list it."""
        directory = self.directory(record.id)
        record.checksums = integrity.seal(directory, (STATE_NAME, DISK_NAME))
        for name in (STATE_NAME, DISK_NAME):
            (directory / name).chmod(0o444)  # a clone's disk reads it as a backing file
        record.size_bytes = disk_usage(directory)
        record.last_used_at = record.created_at
        self._write(record)
        self._records[record.id] = record
        self._staging.discard(record.id)
        return record

    def touch(self, record: SnapshotRecord, now: float | None = None) -> None:
        """Mark ``record`` as used now (for LRU eviction)."""
        record.last_used_at = time.time() if now is None else now
        self._write(record)

    def _write(self, record: SnapshotRecord) -> None:
        integrity.write_json_atomic(self.directory(record.id) / MANIFEST, record.manifest())

    def remove(self, snapshot_id: str) -> None:
        """Forget a snapshot and remove its files (no checks: see ``delete``)."""
        self._records.pop(snapshot_id, None)
        self._staging.discard(snapshot_id)
        shutil.rmtree(self.directory(snapshot_id), ignore_errors=True)

    def delete(self, snapshot_id: str, owner: str | None, in_use: set[str]) -> None:
        """Remove ``owner``'s snapshot unless something still needs it (Conflict then)."""
        record = self.get(snapshot_id, owner)
        if record.id in in_use:
            raise Conflict(
                f"snapshot {record.id} is in use (a sandbox's disk is built on it, or a "
                "create/fork/rewind is restoring it): delete those sandboxes first"
            )
        self.remove(record.id)

    # -- use and eviction -----------------------------------------------------------------------
    @contextlib.contextmanager
    def pin(self, snapshot_id: str) -> Iterator[None]:
        """Keep the snapshot from eviction and deletion while restoring from it."""
        self._pins[snapshot_id] += 1
        try:
            yield
        finally:
            self._pins[snapshot_id] -= 1
            if self._pins[snapshot_id] <= 0:
                del self._pins[snapshot_id]

    def in_use(self, disks: Iterable[Path], live_sandboxes: Iterable[str] = ()) -> set[str]:
        """Ids of snapshots that ``disks`` or other snapshots back onto, pinned ones, and the
        latest checkpoint of each of ``live_sandboxes``."""
        used = {snapshot_id for snapshot_id, count in self._pins.items() if count > 0}
        chain = [*disks, *(self.directory(i) / DISK_NAME for i in self._records)]
        for disk in chain:
            backing = qcow2_backing(disk) if disk.is_file() else None
            if backing is not None and backing.parent.parent == self.root:
                used.add(backing.parent.name)
        for sandbox_id in live_sandboxes:
            checkpoints = self.find(sandbox_id=sandbox_id, kind="checkpoint")
            if checkpoints:
                used.add(checkpoints[-1].id)
        return used

    def evictable(self, in_use: set[str]) -> list[SnapshotRecord]:
        """Snapshots nothing needs, least recently used first."""
        unused = [r for r in self._records.values() if r.id not in in_use]
        return sorted(unused, key=lambda r: (r.last_used_at, r.created_at))

    def over_budget(self, extra_bytes: int = 0) -> int:
        """Bytes over the budget (0 without one or when under it)."""
        if self.budget_mb is None:
            return 0
        return max(0, self.used_bytes() + extra_bytes - self.budget_mb * MB)

    def leftovers(self) -> list[Path]:
        """Directories under the root that are no listed snapshot (unfinished saves)."""
        known = self._records.keys() | self._staging
        return [p for p in self.root.iterdir() if p.is_dir() and p.name not in known]
