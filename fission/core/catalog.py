"""The sandbox catalog: every sandbox of a daemon, in SQLite, so sandboxes outlive the daemon.

One row per sandbox in ``<state>/catalog.db`` (WAL, so the keeper, another process, reads while
the daemon writes): its public facts (owner, spec as JSON, state, times, lost reason), its
directory and memory reservation, and while its VM runs the facts a later daemon needs to
re-attach to it: VM id, directory, the VMM's pid and start time (a recycled pid is never taken
for the VM) and the VM's config and driver facts as JSON (jail uid, cgroups, lent files).
``SandboxManager`` writes through it on every change; a restarted daemon reads it back
(``sandbox_restore``), and so does the keeper (``keeper``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fission.core.sandbox_spec import SandboxRecord, SandboxState, spec_from_json, spec_to_json
from fission.vmm.base import VirtualMachine, VMConfig, config_from_json, config_to_json

CATALOG_NAME = "catalog.db"
BUSY_TIMEOUT_MS = 5000
SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    directory TEXT NOT NULL,
    reserved_mb INTEGER NOT NULL,
    vm_id TEXT,
    workdir TEXT,
    vmm_pid INTEGER,
    vmm_start_time INTEGER,
    vm_config TEXT,
    attachment TEXT,
    lost_reason TEXT
)
"""
JSON_COLUMNS = ("spec", "metadata", "vm_config", "attachment")


@dataclass
class CatalogEntry:
    """One sandbox as the catalog keeps it (JSON columns as dicts)."""

    id: str
    owner: str | None
    spec: dict[str, Any]
    state: str
    created_at: float
    expires_at: float
    directory: str
    reserved_mb: int
    metadata: dict[str, str] = field(default_factory=dict)
    vm_id: str | None = None
    workdir: str | None = None
    vmm_pid: int | None = None
    vmm_start_time: int | None = None
    vm_config: dict[str, Any] | None = None
    attachment: dict[str, Any] | None = None
    lost_reason: str | None = None


COLUMNS = tuple(f.name for f in fields(CatalogEntry))


class Catalog:
    """The catalog of one state directory; every method is one short transaction."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CATALOG_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def put(self, entry: CatalogEntry) -> None:
        """Insert or replace ``entry``'s row."""
        row = asdict(entry)
        values = [json.dumps(row[c]) if c in JSON_COLUMNS else row[c] for c in COLUMNS]
        marks = ", ".join("?" for _ in COLUMNS)
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO sandboxes ({', '.join(COLUMNS)}) VALUES ({marks})",
                values,
            )

    def update(self, sandbox_id: str, **changes: Any) -> None:
        """Change some columns of one row (a missing row is left missing)."""
        unknown = set(changes) - set(COLUMNS)
        if unknown:
            raise ValueError(f"no catalog column {sorted(unknown)}")
        names = list(changes)
        values = [json.dumps(changes[n]) if n in JSON_COLUMNS else changes[n] for n in names]
        assignments = ", ".join(f"{name} = ?" for name in names)
        with self._lock:
            self._db.execute(
                f"UPDATE sandboxes SET {assignments} WHERE id = ?", [*values, sandbox_id]
            )

    def mark_lost(self, sandbox_id: str, reason: str, *, only_if_state: str | None = None) -> bool:
        """Mark a sandbox ``lost`` with ``reason`` (and its VM gone); True if a row changed."""
        condition = "" if only_if_state is None else " AND state = ?"
        extra = [] if only_if_state is None else [only_if_state]
        with self._lock:
            cursor = self._db.execute(
                "UPDATE sandboxes SET state = 'lost', lost_reason = ?, vmm_pid = NULL, "
                f"vmm_start_time = NULL WHERE id = ?{condition}",
                [reason, sandbox_id, *extra],
            )
        return cursor.rowcount > 0

    def remove(self, sandbox_id: str) -> None:
        """Forget a sandbox (deleted or expired)."""
        with self._lock:
            self._db.execute("DELETE FROM sandboxes WHERE id = ?", [sandbox_id])

    def entries(self) -> list[CatalogEntry]:
        """Every sandbox, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM sandboxes ORDER BY created_at, id"
            ).fetchall()
        found = []
        for row in rows:
            data = dict(zip(COLUMNS, row, strict=True))
            for column in JSON_COLUMNS:
                data[column] = json.loads(data[column]) if data[column] is not None else None
            found.append(CatalogEntry(**data))
        return found

    def close(self) -> None:
        """Close the database (safe twice)."""
        with self._lock:
            self._db.close()


def entry_for(
    record: SandboxRecord,
    directory: Path,
    reserved_mb: int,
    config: VMConfig | None,
    vm: VirtualMachine | None,
) -> CatalogEntry:
    """The catalog row of a sandbox; with ``vm`` (it runs), how to re-attach to that VM."""
    attachment = vm.attachment() if vm is not None else None
    return CatalogEntry(
        id=record.id,
        owner=record.owner,
        spec=spec_to_json(record.spec),
        state=record.state.value,
        created_at=record.created_at,
        expires_at=record.expires_at,
        directory=str(directory),
        reserved_mb=reserved_mb,
        metadata=dict(record.spec.metadata),
        vm_id=config.vm_id if config is not None else None,
        workdir=str(config.workdir) if config is not None else None,
        vmm_pid=attachment.get("pid") if attachment else None,
        vmm_start_time=attachment.get("start_time") if attachment else None,
        vm_config=config_to_json(config) if config is not None else None,
        attachment=attachment,
        lost_reason=record.lost_reason,
    )


def record_of(entry: CatalogEntry) -> SandboxRecord:
    """The sandbox record a catalog row describes (InvalidInput if its spec no longer fits)."""
    return SandboxRecord(
        id=entry.id,
        spec=spec_from_json(entry.spec),
        owner=entry.owner,
        created_at=entry.created_at,
        expires_at=entry.expires_at,
        state=SandboxState(entry.state),
        lost_reason=entry.lost_reason,
    )


def config_of(entry: CatalogEntry) -> VMConfig | None:
    """The VM config a catalog row keeps, if any."""
    return config_from_json(entry.vm_config) if entry.vm_config is not None else None
