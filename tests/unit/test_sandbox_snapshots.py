"""Snapshots, forks, checkpoints, rewind and integrity of sandboxes, on the fake VMM driver.

A fake VM's saved state is a tar of its files, and its disk a placeholder whose header names
its backing file like a qcow2 overlay's, so ownership, quotas, "in use", eviction and the
integrity checks run for real here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fission.core import integrity
from fission.core.languages import resolve_language
from fission.core.sandbox_snapshots import MAX_FORK
from fission.core.sandbox_spec import SandboxSpec, SandboxState
from fission.core.service import CLONE_MB, Service
from fission.errors import (
    Busy,
    Conflict,
    IntegrityError,
    InvalidInput,
    QuotaExceeded,
    SandboxNotFound,
    SandboxNotRunning,
    SnapshotNotFound,
)
from fission.vmm.base import DISK_NAME, STATE_NAME, VMConfig
from fission.vmm.fake import FakeDriver
from fission.vmm.jailer import qcow2_backing
from tests.unit.conftest import ServiceStarter

BASH = SandboxSpec(resolve_language("bash"))


async def cat(service: Service, sandbox_id: str, path: str) -> bytes:
    return (await service.sandboxes.exec_command(sandbox_id, f"cat {path}")).stdout


async def test_a_snapshot_leaves_the_sandbox_running_and_lists(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH, owner="k1")
    await sandboxes.exec_command(box.id, "echo one > f")
    snap = await sandboxes.snapshots.snapshot(box.id, "k1", "first")
    assert (snap.name, snap.kind, snap.sandbox_id, snap.owner) == (
        "first",
        "snapshot",
        box.id,
        "k1",
    )
    assert snap.size_bytes > 0 and snap.to_json()["language"] == "bash"
    # the same VM goes on: its files, new writes
    await sandboxes.exec_command(box.id, "echo two > f")
    assert await cat(service, box.id, "f") == b"two\n"
    assert [s.id for s in sandboxes.snapshots.list_snapshots("k1")] == [snap.id]
    assert sandboxes.snapshots.list_snapshots("k2") == []
    with pytest.raises(SnapshotNotFound):
        sandboxes.snapshots.get(snap.id, "k2")
    with pytest.raises(SandboxNotFound):  # another key's sandbox is not there for k2
        await sandboxes.snapshots.snapshot(box.id, "k2")
    directory = sandboxes.snapshots.store.directory(snap.id)
    assert {p.name for p in directory.iterdir()} >= {STATE_NAME, DISK_NAME, "manifest.json"}


async def test_snapshots_survive_a_restart_of_the_service(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    first = await start_service(state_dir=tmp_path / "state")
    box = await first.sandboxes.create(BASH)
    snap = await first.sandboxes.snapshots.snapshot(box.id, name="kept")
    await first.close()
    second = await start_service(state_dir=tmp_path / "state")
    found = second.sandboxes.snapshots.get(snap.id)
    assert (found.name, found.spec.language.name) == ("kept", "bash")
    clone = await second.sandboxes.snapshots.create_from(snap.id)
    assert clone.state == SandboxState.RUNNING


async def test_create_from_a_snapshot_starts_from_its_files(
    service: Service, fake_driver: FakeDriver
) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH, owner="k1")
    await sandboxes.exec_command(box.id, "echo saved > f")
    snap = await sandboxes.snapshots.snapshot(box.id, "k1")
    await sandboxes.exec_command(box.id, "echo later > f")
    clone = await sandboxes.snapshots.create_from(snap.id, "k1", ttl=60, metadata={"a": "b"})
    assert clone.owner == "k1" and clone.spec.ttl == 60 and clone.spec.metadata == {"a": "b"}
    assert await cat(service, clone.id, "f") == b"saved\n"
    assert service.budget.used_mb == 2 * CLONE_MB
    disk = service.journal.sandboxes_dir / clone.id / DISK_NAME
    assert qcow2_backing(disk) == sandboxes.snapshots.store.directory(snap.id) / DISK_NAME
    with pytest.raises(SnapshotNotFound):
        await sandboxes.snapshots.create_from(snap.id, "k2")
    with pytest.raises(SnapshotNotFound):
        await sandboxes.snapshots.create_from("snap_nothere", "k1")


async def test_fork_makes_n_independent_sandboxes(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH, owner="k1")
    await sandboxes.exec_command(box.id, "echo parent > f")
    snap, clones = await sandboxes.snapshots.fork(box.id, 3, "k1")
    assert len({c.id for c in clones}) == 3 and snap.kind == "fork"
    for index, clone in enumerate(clones):
        assert await cat(service, clone.id, "f") == b"parent\n"
        await sandboxes.exec_command(clone.id, f"echo {index} > f")
    assert [await cat(service, c.id, "f") for c in clones] == [b"0\n", b"1\n", b"2\n"]
    assert await cat(service, box.id, "f") == b"parent\n"
    # the fork's snapshot backs the clones' disks: it cannot go while they live
    with pytest.raises(Conflict):
        await sandboxes.snapshots.delete(snap.id, "k1")
    for clone in clones:
        await sandboxes.delete(clone.id)
    with pytest.raises(SnapshotNotFound):  # dropped with its last clone
        sandboxes.snapshots.get(snap.id)


@pytest.mark.parametrize("n", [0, -1, MAX_FORK + 1, True, 2.5])
async def test_fork_refuses_n_out_of_range(service: Service, n: object) -> None:
    box = await service.sandboxes.create(BASH)
    with pytest.raises(InvalidInput, match="fork n="):
        await service.sandboxes.snapshots.fork(box.id, n)  # type: ignore[arg-type]


async def test_fork_of_a_paused_or_deleted_sandbox_is_refused(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH)
    await sandboxes.pause(box.id)
    with pytest.raises(SandboxNotRunning, match="resume it first"):
        await sandboxes.snapshots.fork(box.id, 2)
    await sandboxes.delete(box.id)
    with pytest.raises(SandboxNotFound):
        await sandboxes.snapshots.fork(box.id, 2)
    assert sandboxes.snapshots.list_snapshots() == []


async def test_a_fork_over_the_sandbox_quota_keeps_nothing(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH, owner="k1", max_sandboxes=3)
    with pytest.raises(QuotaExceeded):
        await sandboxes.snapshots.fork(box.id, 3, "k1", max_sandboxes=3)
    assert sandboxes.count() == 1 and sandboxes.snapshots.list_snapshots() == []
    assert service.budget.used_mb == CLONE_MB


async def test_the_snapshot_quota_of_a_key(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH, owner="k1")
    await sandboxes.exec_command(box.id, "head -c 300000 /dev/zero > big")
    with pytest.raises(QuotaExceeded, match="snapshot quota"):
        await sandboxes.snapshots.snapshot(box.id, "k1", max_snapshot_mb=0)
    first = await sandboxes.snapshots.snapshot(box.id, "k1", max_snapshot_mb=1)
    with pytest.raises(QuotaExceeded, match="delete snapshots"):
        for _ in range(8):
            await sandboxes.snapshots.snapshot(box.id, "k1", max_snapshot_mb=1)
    assert sandboxes.snapshots.store.used_bytes("k1") <= 1024 * 1024
    assert first.id in {s.id for s in sandboxes.snapshots.list_snapshots("k1")}


async def test_the_snapshot_budget_evicts_the_least_recently_used(
    start_service: ServiceStarter,
) -> None:
    service = await start_service(snapshot_budget_mb=1)
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH)
    await sandboxes.exec_command(box.id, "head -c 200000 /dev/urandom > big")
    made = [await sandboxes.snapshots.snapshot(box.id, name=str(i)) for i in range(6)]
    kept = [s.id for s in sandboxes.snapshots.list_snapshots()]
    assert kept and len(kept) < 6 and kept == [s.id for s in made[-len(kept) :]]
    assert sandboxes.snapshots.store.over_budget() == 0
    # a used one is fresh again: touch the oldest survivor, take one more, it stays
    await sandboxes.delete((await sandboxes.snapshots.create_from(kept[0])).id)
    await sandboxes.snapshots.snapshot(box.id)
    assert kept[0] in {s.id for s in sandboxes.snapshots.list_snapshots()}


async def test_a_budget_too_small_for_one_snapshot_refuses_it(
    start_service: ServiceStarter,
) -> None:
    service = await start_service(snapshot_budget_mb=0)
    box = await service.sandboxes.create(BASH)
    with pytest.raises(Busy, match="--snapshot-budget"):
        await service.sandboxes.snapshots.snapshot(box.id)
    assert service.sandboxes.snapshots.list_snapshots() == []
    assert (await service.sandboxes.exec_command(box.id, "echo ok")).stdout == b"ok\n"


async def test_checkpoint_and_rewind(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH, owner="k1")
    one = await sandboxes.exec_command(box.id, "echo one > f", owner="k1", checkpoint=True)
    assert one.checkpoint_id and one.to_json()["checkpoint_id"] == one.checkpoint_id
    two = await sandboxes.exec_command(box.id, "echo two > f", checkpoint=True)
    assert two.checkpoint_id not in (None, one.checkpoint_id)
    plain = await sandboxes.exec_command(box.id, "true")
    assert plain.checkpoint_id is None and "checkpoint_id" not in plain.to_json()
    rewound = await sandboxes.snapshots.rewind(box.id, one.checkpoint_id, "k1")
    assert rewound.id == box.id and rewound.state == SandboxState.RUNNING
    assert await cat(service, box.id, "f") == b"one\n"
    kinds = [(s.id, s.kind) for s in sandboxes.snapshots.list_snapshots(sandbox_id=box.id)]
    assert kinds == [(one.checkpoint_id, "checkpoint"), (two.checkpoint_id, "checkpoint")]
    await sandboxes.snapshots.rewind(box.id, two.checkpoint_id)
    assert await cat(service, box.id, "f") == b"two\n"
    assert service.budget.used_mb == CLONE_MB
    other = await sandboxes.create(BASH, owner="k1")
    with pytest.raises(InvalidInput, match="was taken from"):
        await sandboxes.snapshots.rewind(other.id, one.checkpoint_id, "k1")
    with pytest.raises(SandboxNotFound):  # another key's sandbox, as for any other call
        await sandboxes.snapshots.rewind(box.id, one.checkpoint_id, "k2")
    await sandboxes.delete(box.id)  # its checkpoints go with it
    assert sandboxes.snapshots.list_snapshots(sandbox_id=box.id) == []


async def test_rewind_resumes_a_paused_sandbox(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH)
    cp = (await sandboxes.exec_command(box.id, "echo a > f", checkpoint=True)).checkpoint_id
    assert cp is not None
    await sandboxes.exec_command(box.id, "echo b > f")
    await sandboxes.pause(box.id)
    assert service.budget.used_mb == 0
    await sandboxes.snapshots.rewind(box.id, cp)
    assert service.budget.used_mb == CLONE_MB
    assert await cat(service, box.id, "f") == b"a\n"


async def test_checkpoints_per_sandbox_are_bounded(service: Service) -> None:
    sandboxes = service.sandboxes
    sandboxes.snapshots.max_checkpoints = 3
    box = await sandboxes.create(BASH)
    ids = []
    for i in range(5):
        result = await sandboxes.exec_command(box.id, f"echo {i} > f", checkpoint=True)
        ids.append(result.checkpoint_id)
    assert [s.id for s in sandboxes.snapshots.list_snapshots(sandbox_id=box.id)] == ids[-3:]


async def test_a_corrupted_snapshot_is_refused_and_kept(service: Service) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH)
    snap = await sandboxes.snapshots.snapshot(box.id)
    state = sandboxes.snapshots.store.directory(snap.id) / STATE_NAME
    state.chmod(0o644)
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="no longer matches"):
        await sandboxes.snapshots.create_from(snap.id)
    state.write_bytes(bytes(data[:100]))
    with pytest.raises(IntegrityError, match="truncated"):
        await sandboxes.snapshots.rewind(box.id, snap.id)
    assert sandboxes.snapshots.get(snap.id) and sandboxes.count() == 1
    assert (await sandboxes.exec_command(box.id, "echo alive")).stdout == b"alive\n"


async def test_a_corrupted_paused_state_is_refused_and_the_sandbox_stays_paused(
    service: Service,
) -> None:
    sandboxes = service.sandboxes
    box = await sandboxes.create(BASH)
    await sandboxes.exec_command(box.id, "echo kept > f")
    await sandboxes.pause(box.id)
    directory = service.journal.sandboxes_dir / box.id
    assert integrity.RECORD_NAME in {p.name for p in directory.iterdir()}
    good = (directory / STATE_NAME).read_bytes()
    (directory / STATE_NAME).write_bytes(good[:-10])
    with pytest.raises(IntegrityError, match="truncated"):
        await sandboxes.resume(box.id)
    assert sandboxes.get(box.id).state == SandboxState.PAUSED and service.budget.used_mb == 0
    (directory / STATE_NAME).write_bytes(good)  # put back: it resumes as before
    await sandboxes.resume(box.id)
    assert await cat(service, box.id, "f") == b"kept\n"


async def test_gc_reports_and_reclaims_leftovers_and_keeps_what_is_in_use(
    service: Service,
) -> None:
    sandboxes = service.sandboxes
    snaps = sandboxes.snapshots
    box = await sandboxes.create(BASH)
    kept = await snaps.snapshot(box.id, name="kept")
    _fork, (clone,) = await snaps.fork(box.id, 1)
    leftover = snaps.store.root / "snap_unfinished"
    leftover.mkdir()
    (leftover / STATE_NAME).write_bytes(b"x" * 5000)
    assert snaps.derived_root is not None
    stale = snaps.derived_root / "pip-stale"
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text('{"image": "python", "base": "/no/such/template"}')
    dry = await snaps.gc(dry_run=True)
    assert {e["id"] for e in dry["removed"]} == {"snap_unfinished", "pip-stale"}
    assert leftover.exists() and dry["used_bytes"] >= dry["reclaimed_bytes"] > 0
    assert _fork.id in dry["in_use"]  # the clone's disk is built on it
    # a budget of nothing: everything unused goes, the fork snapshot under the clone stays
    done = await snaps.gc(budget_mb=0)
    assert not leftover.exists() and not stale.exists()
    assert {s.id for s in snaps.list_snapshots()} == {_fork.id}
    assert kept.id in {e["id"] for e in done["removed"]}
    await sandboxes.delete(clone.id)


async def test_derived_snapshots_count_against_the_budget(start_service: ServiceStarter) -> None:
    service = await start_service(snapshot_budget_mb=1)
    snaps = service.sandboxes.snapshots
    assert snaps.derived_root is not None
    template = snaps.derived_root.parent / "template"
    template.mkdir(exist_ok=True)
    old = snaps.derived_root / "pip-old"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(f'{{"image": "python", "base": "{template}"}}')
    (old / DISK_NAME).write_bytes(b"d" * 2_000_000)
    box = await service.sandboxes.create(BASH)
    snap = await snaps.snapshot(box.id)  # over the budget with the derived one: it goes
    assert not old.exists() and snaps.get(snap.id)


async def test_fission_gc_on_a_stopped_daemons_state_dir(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from fission.cli import app

    state = tmp_path / "state"
    service = await start_service(state_dir=state)
    box = await service.sandboxes.create(BASH)
    snap = await service.sandboxes.snapshots.snapshot(box.id, name="old")
    await service.close()
    (state / "snapshots" / "snap_halfway").mkdir()
    runner = CliRunner()
    looked = runner.invoke(app, ["gc", "--state-dir", str(state), "--dry-run", "--json"])
    assert looked.exit_code == 0, looked.output
    report = json.loads(looked.stdout)
    assert [e["id"] for e in report["removed"]] == ["snap_halfway"] and report["dry_run"]
    assert (state / "snapshots" / "snap_halfway").exists()
    done = runner.invoke(app, ["gc", "--state-dir", str(state), "--budget", "0"])
    assert done.exit_code == 0, done.output
    assert "removed snapshot " + snap.id in done.stdout and "removed leftover" in done.stdout
    assert not (state / "snapshots" / snap.id).exists()


def test_the_jail_exposes_a_sandboxs_whole_backing_chain(tmp_path: Path) -> None:
    from dataclasses import replace

    from fission.vmm import jailer
    from fission.vmm.jail_plan import exposure

    template = tmp_path / "scratch.ext4"
    template.write_bytes(b"\0" * 4096)
    snapshot_disk, clone_disk = tmp_path / "snap.qcow2", tmp_path / "clone.qcow2"
    driver = FakeDriver()
    driver.layer_disk(template, snapshot_disk)
    driver.layer_disk(snapshot_disk, clone_disk)
    config = FakeDriver().restored(
        replace(_config(tmp_path), scratch=clone_disk), tmp_path, keep_writes=True
    )
    config = replace(config, scratch=clone_disk)
    place = jailer.placement(config)
    assert (place.backing, place.deeper) == (snapshot_disk, (template,))
    seen = exposure(config, place.backing, place.deeper)
    assert {snapshot_disk, template} <= set(seen.read_only) and clone_disk in seen.read_write


def _config(tmp_path: Path) -> VMConfig:
    return VMConfig(
        vm_id="abc",
        kernel=tmp_path / "k",
        initramfs=tmp_path / "i",
        rootfs=tmp_path / "r",
        scratch=tmp_path / "s",
        vcpus=1,
        memory_mb=256,
        workdir=tmp_path / "vm-abc",
    )


def test_serve_takes_a_snapshot_budget(tmp_path: Path) -> None:
    from fission.server.daemon import build_config

    common = {
        "config_file": None,
        "pools": [],
        "memory_budget_mb": 1024,
        "acquire_timeout": None,
        "socket": tmp_path / "s.sock",
        "host": None,
        "port": None,
        "state_dir": tmp_path,
    }
    assert build_config(**common).service.snapshot_budget_mb is None  # type: ignore[arg-type]
    made = build_config(**common, snapshot_budget_mb=2048)  # type: ignore[arg-type]
    assert made.service.snapshot_budget_mb == 2048
    with pytest.raises(InvalidInput, match="--snapshot-budget"):
        build_config(**common, snapshot_budget_mb=0)  # type: ignore[arg-type]
    toml = tmp_path / "fission.toml"
    toml.write_text("snapshot_budget_mb = 512\n")
    from_file = build_config(**(common | {"config_file": toml}))  # type: ignore[arg-type]
    assert from_file.service.snapshot_budget_mb == 512


def test_keys_take_a_snapshot_quota(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fission.auth.keys import KeyStore
    from fission.cli import app

    db = tmp_path / "keys.sqlite3"
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "ci", "--max-snapshot-mb", "64", "--db", str(db)])
    assert made.exit_code == 0, made.output
    assert KeyStore(db).get("ci").limits.max_snapshot_mb == 64
    changed = runner.invoke(
        app, ["keys", "limits", "ci", "--max-snapshot-mb", "128", "--db", str(db)]
    )
    assert changed.exit_code == 0 and "128 MB of snapshots" in changed.stdout
    bad = runner.invoke(app, ["keys", "limits", "ci", "--max-snapshot-mb", "0", "--db", str(db)])
    assert bad.exit_code != 0 and "--max-snapshot-mb" in bad.output


def test_a_key_database_from_before_snapshot_quotas_gets_the_default(tmp_path: Path) -> None:
    import sqlite3

    from fission.auth.keys import DEFAULT_MAX_SNAPSHOT_MB, KeyStore

    db = tmp_path / "old.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_sha256 TEXT "
            "NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT, max_concurrent_sandboxes "
            "INTEGER NOT NULL, rate_per_minute INTEGER NOT NULL)"
        )
        conn.execute(
            "INSERT INTO api_keys VALUES ('a1', 'old', 'x', '2026-01-01T00:00:00+00:00', NULL, 3, 60)"
        )
    with KeyStore(db) as store:
        key = store.get("old")
    assert (key.limits.max_concurrent_sandboxes, key.limits.max_snapshot_mb) == (
        3,
        DEFAULT_MAX_SNAPSHOT_MB,
    )
