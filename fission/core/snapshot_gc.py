"""Keeping snapshot storage bounded: what takes space, what may go, and reclaiming it.

Two kinds of saved VMs share one disk budget (``fission serve --snapshot-budget``): the sandbox
snapshots of this daemon (``snapshot_store``: snapshots, checkpoints, fork snapshots) and the
derived snapshots ``fission install`` caches (``derived``). ``reclaim`` removes, in order:

1. leftovers: snapshot directories without a manifest (a save that never finished) and derived
   snapshots whose base template is gone (they can never be restored again);
2. then, while the total is over the budget, unused snapshots, least recently used first.

Never one in use: a snapshot being restored (pinned), one a disk still backs onto, the latest
checkpoint of a sandbox that exists, or a derived snapshot being restored.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fission.core import derived
from fission.core.snapshot_store import MB, SnapshotStore, disk_usage
from fission.vmm.base import DISK_NAME


@dataclass(frozen=True)
class Entry:
    """One saved VM on disk, as the budget sees it."""

    kind: str  # snapshot, checkpoint, fork, derived, leftover
    id: str
    path: Path
    size_bytes: int
    last_used_at: float
    in_use: bool
    owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"path": str(self.path)}


def derived_entries(root: Path | None) -> tuple[list[Entry], list[Entry]]:
    """The derived snapshots under ``root``: (restorable ones, stale ones)."""
    if root is None or not root.is_dir():
        return [], []
    good: list[Entry] = []
    stale: list[Entry] = []
    for directory in sorted(root.iterdir()):
        meta = directory / "meta.json"
        try:
            base = json.loads(meta.read_text())["base"]
            last_used = meta.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being built by someone, or not ours
        entry = Entry(
            "derived",
            directory.name,
            directory,
            disk_usage(directory),
            last_used,
            derived.in_use(directory),
        )
        (stale if isinstance(base, str) and base and not Path(base).is_dir() else good).append(
            entry
        )
    return good, stale


def entries(
    store: SnapshotStore, in_use: set[str], derived_root: Path | None
) -> tuple[list[Entry], list[Entry]]:
    """(every saved VM that counts against the budget, leftovers that are pure waste)."""
    kept = [
        Entry(
            r.kind,
            r.id,
            store.directory(r.id),
            r.size_bytes,
            r.last_used_at,
            r.id in in_use,
            r.owner,
        )
        for r in store.find()
    ]
    good, stale = derived_entries(derived_root)
    waste = [Entry("leftover", p.name, p, disk_usage(p), 0.0, False) for p in store.leftovers()]
    return kept + good, waste + stale


def remove(store: SnapshotStore, entry: Entry) -> None:
    """Delete one entry's files."""
    if entry.kind in ("snapshot", "checkpoint", "fork"):
        store.remove(entry.id)
    else:
        shutil.rmtree(entry.path, ignore_errors=True)


def reclaim(
    store: SnapshotStore,
    in_use: set[str],
    derived_root: Path | None,
    *,
    dry_run: bool = False,
    budget_mb: int | None = None,
) -> dict[str, Any]:
    """Remove leftovers, then unused snapshots (LRU) until under ``budget_mb``; a report."""
    budget_mb = store.budget_mb if budget_mb is None else budget_mb
    kept, waste = entries(store, in_use, derived_root)
    used = sum(e.size_bytes for e in kept) + sum(e.size_bytes for e in waste)
    removed = list(waste)
    total = sum(e.size_bytes for e in kept)
    if budget_mb is not None:
        for entry in sorted((e for e in kept if not e.in_use), key=lambda e: e.last_used_at):
            if total <= budget_mb * MB:
                break
            removed.append(entry)
            total -= entry.size_bytes
    if not dry_run:
        for entry in removed:
            remove(store, entry)
    by_kind: dict[str, int] = {}
    for entry in kept:
        by_kind[entry.kind] = by_kind.get(entry.kind, 0) + entry.size_bytes
    return {
        "dry_run": dry_run,
        "budget_mb": budget_mb,
        "used_bytes": used,
        "used_by_kind": by_kind,
        "reclaimed_bytes": sum(e.size_bytes for e in removed),
        "removed": [e.to_json() for e in removed],
        "in_use": sorted(e.id for e in kept if e.in_use),
    }


def total_bytes(store: SnapshotStore, derived_root: Path | None) -> int:
    """Bytes every saved VM under the budget takes (sandbox snapshots and derived ones)."""
    good, _stale = derived_entries(derived_root)
    return store.used_bytes() + sum(e.size_bytes for e in good)


def reclaim_state_dir(
    state_dir: Path, derived_root: Path | None, *, dry_run: bool, budget_mb: int | None
) -> dict[str, Any]:
    """``reclaim`` on a stopped daemon's state dir (the caller holds its lock)."""
    store = SnapshotStore(state_dir / "snapshots", budget_mb)
    boxes = [p for p in (state_dir / "sandboxes").glob("*") if p.is_dir()]
    in_use = store.in_use([box / DISK_NAME for box in boxes], [box.name for box in boxes])
    return reclaim(store, in_use, derived_root, dry_run=dry_run, budget_mb=budget_mb)
