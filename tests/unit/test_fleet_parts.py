"""The fleet's parts that need no Ray: placement, the fleet catalog, moving a paused sandbox
between two hosts' Services (the fake driver), and single-host mode never importing Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fission.core import sandbox_moves
from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.errors import Conflict, IntegrityError, InvalidInput, SandboxNotRunning
from fission.fleet import placement
from fission.fleet.catalog import FleetCatalog, record_of, row_of
from fission.fleet.placement import HostView
from fission.vmm.base import DISK_NAME
from tests.unit.conftest import ServiceStarter

REPO = Path(__file__).resolve().parents[2]
BASH = SandboxSpec(resolve_language("bash"))


def host(name: str, free: int, warm: int = 0, **facts: bool) -> HostView:
    return HostView(name, f"node-of-{name}", free, 4096, {"python": warm}, **facts)


# -- placement -------------------------------------------------------------------------------------
def test_runs_go_to_a_warm_host_first_then_to_the_most_free_memory() -> None:
    hosts = [host("a", 3000), host("b", 1000, warm=1), host("c", 3500)]
    assert [h.name for h in placement.for_run(hosts, "python")] == ["b", "c", "a"]
    assert [h.name for h in placement.for_run(hosts, "node")] == ["c", "a", "b"]


def test_a_warm_vm_counted_as_taken_sends_the_next_run_elsewhere() -> None:
    hosts = [host("a", 3000, warm=1), host("b", 3000, warm=1)]
    first = placement.for_run(hosts, "python")[0]
    placement.took_warm(first, "python")
    assert placement.for_run(hosts, "python")[0].name != first.name


def test_sandboxes_go_where_they_fit_preferring_the_named_host() -> None:
    hosts = [host("a", 2000), host("b", 500), host("c", 1500)]
    assert [h.name for h in placement.for_sandbox(hosts, 1120)] == ["a", "c"]
    assert [h.name for h in placement.for_sandbox(hosts, 1120, prefer="c")] == ["c", "a"]
    assert [h.name for h in placement.for_sandbox(hosts, 1120, prefer="b")] == ["a", "c"]
    placement.took(hosts[0], 1120)
    assert placement.for_sandbox(hosts, 1120)[0].name == "c"


def test_draining_and_dead_hosts_take_nothing_new() -> None:
    hosts = [host("a", 4000, warm=2, draining=True), host("b", 4000, alive=False), host("c", 10)]
    assert [h.name for h in placement.for_run(hosts, "python")] == ["c"]
    assert placement.for_sandbox(hosts, 100) == []


def test_a_host_view_reads_an_agent_report() -> None:
    report = {
        "host": "h",
        "node_id": "n",
        "service": {
            "pools": [{"language": "python", "ready": 2}],
            "memory_budget_mb": 4096,
            "memory_reserved_mb": 1120,
            "sandboxes": 3,
        },
    }
    view = HostView.from_status(report)
    assert (view.free_mb, view.warm, view.sandboxes, view.open) == (2976, {"python": 2}, 3, True)


# -- the fleet catalog -----------------------------------------------------------------------------
def record(n: int, owner: str = "k1", team: str = "ml") -> SandboxRecord:
    spec = SandboxSpec(resolve_language("python"), metadata={"team": team})
    return SandboxRecord(f"sbx_{n:016x}", spec, owner, 1000.0 + n, 2000.0 + n)


def test_the_catalog_pages_by_creation_with_filters(tmp_path: Path) -> None:
    catalog = FleetCatalog(tmp_path / "fleet.db")
    for n in range(7):
        catalog.put(row_of(record(n, owner="k1" if n % 2 else "k2", team="ml"), f"h{n % 3}"))
    catalog.put(row_of(record(9, team="web"), "h0"))
    seen, cursor = [], None
    while True:
        rows, cursor = catalog.page("k1", None, {"team": "ml"}, 2, cursor)
        seen += [row["id"] for row in rows]
        if cursor is None:
            break
    assert seen == [record(n).id for n in (1, 3, 5)]
    assert record_of(catalog.get(record(3).id) or {}) == record(3)
    with pytest.raises(InvalidInput, match="limit"):
        catalog.page(None, None, {}, 0, None)
    with pytest.raises(InvalidInput, match="cursor"):
        catalog.page(None, None, {}, 5, "nonsense")


def test_a_lost_host_loses_its_sandboxes_naming_why(tmp_path: Path) -> None:
    catalog = FleetCatalog(tmp_path / "fleet.db")
    catalog.join("h1", "node-1")
    catalog.join("h2", "node-2")
    catalog.put(row_of(record(1), "h1"))
    catalog.put(row_of(record(2), "h2"))
    catalog.put_snapshot("snap_1", "h1", "k1")
    assert catalog.host_lost("h1", "host h1 (node node-1) died at T") == 1
    lost = catalog.get(record(1).id) or {}
    assert (lost["state"], lost["lost_reason"]) == ("lost", "host h1 (node node-1) died at T")
    assert (catalog.get(record(2).id) or {})["state"] == "running"
    assert catalog.snapshot_host("snap_1") is None
    assert [(h["name"], h["alive"]) for h in catalog.hosts()] == [("h1", False), ("h2", True)]
    assert catalog.census() == {"h1": {"lost": 1}, "h2": {"running": 1}}
    assert catalog.owned("k1") == 1
    catalog.join("h1", "node-3")  # back on another node: alive again
    assert [h["alive"] for h in catalog.hosts()] == [True, True]


def test_a_host_report_updates_its_rows_and_never_another_hosts(tmp_path: Path) -> None:
    catalog = FleetCatalog(tmp_path / "fleet.db")
    catalog.put(row_of(record(1), "h1"))
    catalog.put(row_of(record(2), "h2"))  # moved to h2: h1's stale report must not take it back
    paused = record(1)
    paused.state = SandboxState.PAUSED
    stale = row_of(record(2), "h1") | {"state": "paused"}
    catalog.sync_host("h1", [row_of(paused, "h1"), stale], removed=[record(2).id])
    assert (catalog.get(record(1).id) or {})["state"] == "paused"
    assert catalog.get(record(2).id) == row_of(record(2), "h2")
    catalog.sync_host("h1", [], removed=[record(1).id])  # expired on h1
    assert catalog.get(record(1).id) is None


# -- moving a paused sandbox -----------------------------------------------------------------------
async def test_a_paused_sandbox_moves_to_another_host_with_its_files(
    start_service: ServiceStarter,
) -> None:
    source, target = await start_service(), await start_service()
    made = await source.sandboxes.create(BASH, owner="k1")
    await source.sandboxes.exec_command(made.id, "echo kept > notes.txt")
    with pytest.raises(SandboxNotRunning, match="only a paused sandbox"):
        await sandbox_moves.export_paused(source.sandboxes, made.id)
    await source.sandboxes.pause(made.id)
    entry, blob = await sandbox_moves.export_paused(source.sandboxes, made.id)
    await sandbox_moves.import_paused(target.sandboxes, entry, blob)
    with pytest.raises(Conflict, match="already on this host"):
        await sandbox_moves.import_paused(target.sandboxes, entry, blob)
    await sandbox_moves.forget_moved(source.sandboxes, made.id)
    assert source.sandboxes.count() == 0 and not Path(entry.directory).exists()
    moved = await target.sandboxes.resume(made.id, owner="k1")
    assert moved.state == SandboxState.RUNNING and moved.owner == "k1"
    ran = await target.sandboxes.exec_command(made.id, "cat notes.txt")
    assert ran.stdout == b"kept\n"
    await target.sandboxes.delete(made.id)


async def test_a_moved_sandbox_whose_files_changed_on_the_way_is_refused(
    start_service: ServiceStarter,
) -> None:
    source, target = await start_service(), await start_service()
    made = await source.sandboxes.create(BASH)
    await source.sandboxes.pause(made.id)
    entry, blob = await sandbox_moves.export_paused(source.sandboxes, made.id)
    await sandbox_moves.import_paused(target.sandboxes, entry, blob)
    (target.journal.sandboxes_dir / made.id / DISK_NAME).write_bytes(b"changed on the way")
    with pytest.raises(IntegrityError):
        await target.sandboxes.resume(made.id)
    assert target.sandboxes.get(made.id).state == SandboxState.PAUSED
    await target.sandboxes.delete(made.id)
    await source.sandboxes.delete(made.id)


# -- single host mode ------------------------------------------------------------------------------
def test_single_host_mode_never_imports_ray(tmp_path: Path) -> None:
    code = """
import json, sys
from pathlib import Path
import fission.cli.commands, fission.server.app, fission.server.daemon, fission.mcp.server
from fission.server.daemon import build_config, make_service
config = build_config(config_file=None, pools=[], memory_budget_mb=512, acquire_timeout=None,
    socket=Path(sys.argv[1], "d.sock"), host=None, port=None, state_dir=Path(sys.argv[1], "state"))
service = make_service(config)
fission.server.app.create_app(service)
print(json.dumps(sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "fission.fleet")))))
"""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
