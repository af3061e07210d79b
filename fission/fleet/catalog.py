"""The fleet catalog: every host, and every sandbox with its home host, in one SQLite file.

Only the control actor (``control``) opens it, so there is one writer and no locking across
processes; front ends ask that actor. A sandbox row holds the record the APIs show (spec as
JSON, state, times, lost reason) and the host it lives on; ``get`` and listings are answered
from here without asking the hosts. Rows are written through by the front ends on every change
they make, and brought up to date by the hosts' periodic reports (``sync_host``: what changed
there by itself, a ttl expiring, an idle sandbox paused). Sandbox ids do not encode the host:
a paused sandbox may move (``move``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from fission.core.sandbox_spec import (
    MAX_PAGE_SIZE,
    SandboxRecord,
    SandboxState,
    parse_cursor,
    spec_from_json,
    spec_to_json,
)
from fission.errors import InvalidInput

SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    joined_at REAL NOT NULL,
    alive INTEGER NOT NULL DEFAULT 1,
    lost_at REAL,
    draining INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    owner TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    spec TEXT NOT NULL,
    lost_reason TEXT,
    lost_at REAL
);
CREATE INDEX IF NOT EXISTS sandboxes_order ON sandboxes (created_at, id);
CREATE INDEX IF NOT EXISTS sandboxes_host ON sandboxes (host, state);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    owner TEXT
);
"""
COLUMNS = ("id", "host", "owner", "state", "created_at", "expires_at", "spec", "lost_reason")


def row_of(record: SandboxRecord, host: str) -> dict[str, Any]:
    """A sandbox record as the catalog (and the wire between actors) keeps it."""
    return {
        "id": record.id,
        "host": host,
        "owner": record.owner,
        "state": record.state.value,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "spec": spec_to_json(record.spec),
        "lost_reason": record.lost_reason,
    }


def record_of(row: dict[str, Any]) -> SandboxRecord:
    """The record a catalog row describes."""
    return SandboxRecord(
        id=row["id"],
        spec=spec_from_json(row["spec"]),
        owner=row["owner"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        state=SandboxState(row["state"]),
        lost_reason=row["lost_reason"],
    )


class FleetCatalog:
    """The fleet's hosts and sandboxes; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    # -- hosts -------------------------------------------------------------------------------------
    def join(self, name: str, node_id: str) -> None:
        """Record a host (again) as alive on ``node_id``."""
        self._db.execute(
            "INSERT INTO hosts (name, node_id, joined_at) VALUES (?, ?, ?) ON CONFLICT(name) "
            "DO UPDATE SET node_id = excluded.node_id, joined_at = excluded.joined_at, "
            "alive = 1, lost_at = NULL",
            [name, node_id, time.time()],
        )

    def hosts(self) -> list[dict[str, Any]]:
        """Every host ever seen, alive or not."""
        rows = self._db.execute(
            "SELECT name, node_id, joined_at, alive, lost_at, draining FROM hosts ORDER BY name"
        ).fetchall()
        keys = ("name", "node_id", "joined_at", "alive", "lost_at", "draining")
        return [
            dict(zip(keys, row, strict=True)) | {"alive": bool(row[3]), "draining": bool(row[5])}
            for row in rows
        ]

    def drain(self, name: str, draining: bool) -> bool:
        """Stop (or start again) placing new work on a host; False if there is no such host."""
        changed = self._db.execute(
            "UPDATE hosts SET draining = ? WHERE name = ?", [int(draining), name]
        )
        return changed.rowcount > 0

    def host_lost(self, name: str, reason: str) -> int:
        """Mark a host dead and every sandbox on it ``lost``; how many sandboxes were lost."""
        now = time.time()
        self._db.execute("BEGIN")
        self._db.execute("UPDATE hosts SET alive = 0, lost_at = ? WHERE name = ?", [now, name])
        lost = self._db.execute(
            "UPDATE sandboxes SET state = 'lost', lost_reason = ?, lost_at = ? "
            "WHERE host = ? AND state != 'lost'",
            [reason, now, name],
        ).rowcount
        self._db.execute("DELETE FROM snapshots WHERE host = ?", [name])
        self._db.execute("COMMIT")
        return lost

    # -- sandboxes ---------------------------------------------------------------------------------
    def put(self, row: dict[str, Any]) -> None:
        """Insert or replace a sandbox's row."""
        values = [json.dumps(row[c]) if c == "spec" else row[c] for c in COLUMNS]
        self._db.execute(
            f"INSERT OR REPLACE INTO sandboxes ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in COLUMNS)})",
            values,
        )

    def remove(self, sandbox_id: str) -> None:
        """Forget a sandbox (deleted)."""
        self._db.execute("DELETE FROM sandboxes WHERE id = ?", [sandbox_id])

    def get(self, sandbox_id: str) -> dict[str, Any] | None:
        """A sandbox's row, or None."""
        found = self._select("WHERE id = ?", [sandbox_id])
        return found[0] if found else None

    def sync_host(self, host: str, rows: list[dict[str, Any]], removed: list[str]) -> None:
        """Apply a host's report: rows that changed there, ids it no longer has."""
        self._db.execute("BEGIN")
        for row in rows:
            values = [json.dumps(row[c]) if c == "spec" else row[c] for c in COLUMNS]
            # A row that moved to another host meanwhile is that host's to report.
            self._db.execute(
                f"INSERT INTO sandboxes ({', '.join(COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in COLUMNS)}) ON CONFLICT(id) DO UPDATE SET "
                "state = excluded.state, expires_at = excluded.expires_at, "
                "spec = excluded.spec, lost_reason = excluded.lost_reason "
                "WHERE sandboxes.host = excluded.host",
                values,
            )
        for sandbox_id in removed:
            self._db.execute("DELETE FROM sandboxes WHERE id = ? AND host = ?", [sandbox_id, host])
        self._db.execute("COMMIT")

    def page(
        self,
        owner: str | None,
        state: str | None,
        metadata: dict[str, str],
        limit: int,
        cursor: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of rows (by creation, then id) after ``cursor``, and the next cursor."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidInput(f"limit {limit} is out of range: use 1 to {MAX_PAGE_SIZE}")
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        for key, value in metadata.items():
            where.append("json_extract(spec, ?) = ?")
            args += ["$.metadata." + json.dumps(key), value]
        if cursor:
            created, last_id = parse_cursor(cursor)
            where.append("(created_at > ? OR (created_at = ? AND id > ?))")
            args += [created, created, last_id]
        rows = self._select(
            f"WHERE {' AND '.join(where)} ORDER BY created_at, id LIMIT ?", [*args, limit + 1]
        )
        chunk = rows[:limit]
        more = len(rows) > limit
        next_cursor = f"{chunk[-1]['created_at']!r}~{chunk[-1]['id']}" if more else None
        return chunk, next_cursor

    def census(self) -> dict[str, dict[str, int]]:
        """Sandboxes by host and state."""
        counts: dict[str, dict[str, int]] = {}
        rows = self._db.execute("SELECT host, state, COUNT(*) FROM sandboxes GROUP BY host, state")
        for host, state, count in rows:
            counts.setdefault(host, {})[state] = count
        return counts

    def owned(self, owner: str) -> int:
        """How many sandboxes ``owner`` holds (running or paused) across the fleet."""
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM sandboxes WHERE owner = ? AND state IN ('running', 'paused')",
            [owner],
        ).fetchone()
        return int(count)

    def _select(self, tail: str, args: list[Any]) -> list[dict[str, Any]]:
        rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM sandboxes {tail}", args)
        found = []
        for row in rows:
            data = dict(zip(COLUMNS, row, strict=True))
            data["spec"] = json.loads(data["spec"])
            found.append(data)
        return found

    # -- snapshots ---------------------------------------------------------------------------------
    def put_snapshot(self, snapshot_id: str, host: str, owner: str | None) -> None:
        """Remember which host holds a snapshot."""
        self._db.execute(
            "INSERT OR REPLACE INTO snapshots (id, host, owner) VALUES (?, ?, ?)",
            [snapshot_id, host, owner],
        )

    def snapshot_host(self, snapshot_id: str) -> str | None:
        """The host holding a snapshot, or None."""
        row = self._db.execute("SELECT host FROM snapshots WHERE id = ?", [snapshot_id]).fetchone()
        return row[0] if row else None

    def remove_snapshot(self, snapshot_id: str) -> None:
        """Forget a snapshot (deleted)."""
        self._db.execute("DELETE FROM snapshots WHERE id = ?", [snapshot_id])

    def close(self) -> None:
        """Close the database."""
        self._db.close()
