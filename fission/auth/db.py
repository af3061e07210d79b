"""The SQLite file that holds the API keys and the audit log: opening it and running statements.

One ``Database`` per store per process: a single connection behind a lock (short statements, so
threads and the event loop barely wait), WAL mode so readers never block the one writer, and a
busy timeout so a `fission keys` command and a running daemon can share the file. Every
``sqlite3`` error becomes a ``FissionError`` here and nowhere else.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from fission.config import data_dir
from fission.errors import FissionError

BUSY_TIMEOUT = 5.0  # seconds a statement waits for another process's write to finish


def default_db_path() -> Path:
    """Where the key and audit database lives unless ``--db`` says otherwise."""
    return data_dir() / "fission.sqlite3"


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def to_iso(moment: datetime) -> str:
    """``moment`` as UTC ISO 8601 with microseconds, so stored strings sort in time order."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    """A timestamp written by ``to_iso``."""
    return datetime.fromisoformat(text)


def _create_private(path: Path) -> None:
    """Create ``path`` (and its directory) readable by this user only, unless it exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits, but be exact
    finally:
        os.close(fd)


class Database:
    """One SQLite connection to ``path``, shared by this process's threads behind a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            _create_private(path)
            # Autocommit; writes open their own BEGIN IMMEDIATE transaction. SQLite creates
            # the -wal and -shm files with the database file's mode.
            self._conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise FissionError(f"cannot open the fission database {path}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            self._conn.close()
            raise FissionError(f"cannot use the fission database {path}: {exc}") from exc

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection for reading statements (each is its own snapshot)."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise FissionError(f"reading the fission database {self.path}: {exc}") from exc

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one short write transaction, committed unless an error escapes."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise FissionError(f"writing the fission database {self.path}: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:  # some errors already rolled it back
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise FissionError(f"writing the fission database {self.path}: {exc}") from exc
                raise

    def ensure_schema(self, script: str) -> None:
        """Run ``;``-separated ``CREATE ... IF NOT EXISTS`` statements in one transaction."""
        # executescript() would commit first, so split and run the statements one by one.
        with self.write() as conn:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            self._conn.close()
