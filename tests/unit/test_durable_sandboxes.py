"""Sandboxes that outlive their daemon, on the fake VMM driver: the catalog, re-attaching after
a restart, ``lost`` sandboxes, ``--on-stop``, retention, ``on_timeout="pause"`` and the keeper.

A "restart" is a second Service on the same state dir and the same fake driver: the first one
stops with ``on_stop="keep"`` (as a SIGKILLed daemon leaves them, its VMs live on, their agent
channels closed) and the second takes its catalogued sandboxes back.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fission.core import keeper
from fission.core.catalog import Catalog, CatalogEntry, config_of, entry_for, record_of
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.managed_sandbox import vm_memory_mb
from fission.core.sandbox_spec import (
    NetworkPolicy,
    SandboxRecord,
    SandboxSpec,
    SandboxState,
    spec_from_json,
    spec_to_json,
)
from fission.core.service import Service, ServiceConfig
from fission.errors import Busy, InvalidInput, SandboxNotFound, SandboxNotRunning
from fission.vmm import jailer
from fission.vmm.base import VMConfig, config_from_json, config_to_json
from fission.vmm.fake import FakeDriver
from fission.vmm.processes import process_start_time
from tests.unit.conftest import ServiceStarter, eventually

BASH = SandboxSpec(resolve_language("bash"))


def test_a_spec_survives_its_json_form() -> None:
    spec = SandboxSpec(
        resolve_language("py"),
        Limits(timeout=7, memory_mb=512, disk_mb=1024, pids=64, output_limit_mb=2.5),
        ttl=123.5,
        env={"A": "1"},
        metadata={"team": "ml"},
        network=NetworkPolicy.allowing(["pypi.org:443"], max_connections=3),
        on_timeout="pause",
    )
    data = spec_to_json(spec)
    assert data["language"] == "python" and data["on_timeout"] == "pause"
    assert spec_from_json(data) == spec
    assert spec_from_json(spec_to_json(BASH)) == BASH
    with pytest.raises(InvalidInput, match="on_timeout"):
        SandboxSpec(resolve_language("bash"), on_timeout="explode")


def test_the_catalog_keeps_every_fact(tmp_path: Path) -> None:
    config = VMConfig(
        "abc",
        Path("/k"),
        Path("/i"),
        Path("/r"),
        Path("/d/disk.qcow2"),
        1,
        1120,
        Path("/w/vm-abc"),
        kernel_args=("a=1",),
        incoming=Path("/d/state"),
        detached=True,
    )
    assert config_from_json(config_to_json(config)) == config
    record = SandboxRecord("sbx_1", BASH, "key1", 10.0, 20.0, SandboxState.PAUSED)
    catalog = Catalog(tmp_path)
    catalog.put(entry_for(record, tmp_path / "sbx_1", 300, config, None))
    (entry,) = Catalog(tmp_path).entries()  # another connection (the keeper) sees it
    assert record_of(entry) == record and config_of(entry) == config
    assert (entry.directory, entry.reserved_mb, entry.vm_id) == (
        str(tmp_path / "sbx_1"),
        300,
        "abc",
    )
    assert catalog.mark_lost("sbx_1", "gone", only_if_state="running") is False
    assert catalog.mark_lost("sbx_1", "gone") is True
    lost = record_of(catalog.entries()[0])
    assert (lost.state, lost.lost_reason) == (SandboxState.LOST, "gone")
    catalog.remove("sbx_1")
    assert catalog.entries() == []
    catalog.close()


async def durable(start: ServiceStarter, state_dir: Path, **options: object) -> Service:
    return await start(state_dir=state_dir, durable_sandboxes=True, **options)


async def read(service: Service, sandbox_id: str, path: str) -> bytes:
    return b"".join([c async for c in service.sandboxes.read_file(sandbox_id, path)])


async def test_a_restart_takes_back_running_and_paused_sandboxes(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state")
    running = await first.sandboxes.create(BASH, owner="key1", max_sandboxes=5)
    paused = await first.sandboxes.create(BASH, owner="key1", max_sandboxes=5)
    await first.sandboxes.write_file(running.id, "/home/sandbox/kept", b"before")
    await first.sandboxes.write_file(paused.id, "/home/sandbox/kept", b"paused")
    await first.sandboxes.pause(paused.id)
    await first.close()  # on_stop "keep": the running VM lives on
    assert len(fake_driver.live) == 1

    second = await durable(start_service, tmp_path / "state")
    box = second.sandboxes
    states = {r.id: r.state for r in box.list_sandboxes()[0]}
    assert states == {running.id: SandboxState.RUNNING, paused.id: SandboxState.PAUSED}
    assert second.restored == {"running": 1, "paused": 1, "lost": 0}
    assert await read(second, running.id, "/home/sandbox/kept") == b"before"
    (vm,) = fake_driver.live
    assert vm.guest is not None and vm.guest.inits[-1]["restored"] is False  # no reseed
    # Its memory and its owner's quota slots were taken again.
    assert second.budget.used_mb == vm_memory_mb(BASH.limits)
    assert box.quotas.in_use("key1") == 2
    await box.resume(paused.id)
    assert await read(second, paused.id, "/home/sandbox/kept") == b"paused"
    assert second.budget.used_mb == 2 * vm_memory_mb(BASH.limits)
    # Deleting goes through the catalog too: a third daemon finds nothing.
    box.on_stop = "delete"
    await second.close()
    assert not fake_driver.live and Catalog(tmp_path / "state").entries() == []


async def test_a_vm_that_ended_meanwhile_leaves_its_sandbox_lost(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state")
    record = await first.sandboxes.create(BASH, owner="key1", max_sandboxes=5)
    await first.close()
    (vm,) = fake_driver.live
    await vm.destroy()  # the VMM died while no daemon managed it

    second = await durable(start_service, tmp_path / "state")
    lost = second.sandboxes.get(record.id)
    assert lost.state == SandboxState.LOST
    assert lost.lost_reason is not None and "ended while no daemon managed it" in lost.lost_reason
    assert lost.to_json()["lost_reason"] == lost.lost_reason
    assert second.budget.used_mb == 0 and second.sandboxes.quotas.in_use("key1") == 0
    assert not (second.journal.sandboxes_dir / record.id).exists()
    with pytest.raises(SandboxNotRunning, match="lost"):
        await second.sandboxes.run_code(record.id, "echo hi")
    with pytest.raises(SandboxNotRunning, match="lost"):
        await second.sandboxes.resume(record.id)
    # It stays listed after yet another restart, until deleted.
    await second.close()
    third = await durable(start_service, tmp_path / "state")
    assert third.sandboxes.get(record.id).state == SandboxState.LOST
    assert third.sandboxes.count() == 0  # a lost sandbox keeps no daemon busy (--idle-exit)
    await third.sandboxes.delete(record.id)
    with pytest.raises(SandboxNotFound):
        third.sandboxes.get(record.id)


async def test_a_paused_sandbox_without_its_saved_state_is_lost(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state")
    record = await first.sandboxes.create(BASH)
    await first.sandboxes.pause(record.id)
    await first.close()
    (first.journal.sandboxes_dir / record.id / "state").unlink()
    second = await durable(start_service, tmp_path / "state")
    lost = second.sandboxes.get(record.id)
    assert lost.state == SandboxState.LOST and "saved state is gone" in str(lost.lost_reason)


async def test_on_stop_pause_saves_running_sandboxes(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state", on_stop="pause")
    record = await first.sandboxes.create(BASH)
    await first.sandboxes.write_file(record.id, "/home/sandbox/f", b"data")
    await first.close()
    assert not fake_driver.live
    second = await durable(start_service, tmp_path / "state", on_stop="delete")
    assert second.sandboxes.get(record.id).state == SandboxState.PAUSED
    await second.sandboxes.resume(record.id)
    assert await read(second, record.id, "/home/sandbox/f") == b"data"


async def test_on_stop_delete_ends_every_sandbox(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state", on_stop="delete")
    await first.sandboxes.create(BASH)
    await first.close()
    assert not fake_driver.live
    second = await durable(start_service, tmp_path / "state")
    assert second.sandboxes.count() == 0


async def test_without_durable_sandboxes_end_with_the_service(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await start_service(state_dir=tmp_path / "state", on_stop="keep")
    await first.sandboxes.create(BASH)
    await first.close()  # not durable: "keep" does not apply
    assert not fake_driver.live
    second = await start_service(state_dir=tmp_path / "state")
    assert second.sandboxes.count() == 0


async def test_a_paused_sandbox_expires_after_the_retention(
    start_service: ServiceStarter, tmp_path: Path
) -> None:
    service = await durable(start_service, tmp_path / "state", paused_retention=1.0)
    record = await service.sandboxes.create(BASH)
    paused = await service.sandboxes.pause(record.id)
    assert paused.expires_at <= time.time() + 1.0
    catalog = Catalog(tmp_path / "state")
    await eventually(lambda: catalog.entries() == [], "the paused sandbox to expire", 5)
    assert service.sandboxes.count() == 0
    catalog.close()


async def test_on_timeout_pause_pauses_at_the_end_of_the_ttl(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    service = await durable(start_service, tmp_path / "state", on_stop="delete")
    spec = SandboxSpec(resolve_language("bash"), ttl=1, on_timeout="pause")
    record = await service.sandboxes.create(spec)
    await service.sandboxes.write_file(record.id, "/home/sandbox/f", b"kept")

    def paused() -> bool:
        return service.sandboxes.get(record.id).state == SandboxState.PAUSED

    await eventually(paused, "the sandbox to be paused at its ttl", 5)
    assert not fake_driver.live and service.budget.used_mb == 0
    await service.sandboxes.resume(record.id)
    assert await read(service, record.id, "/home/sandbox/f") == b"kept"


def keeper_entry(sandbox_id: str, pid: int, expires_at: float) -> CatalogEntry:
    return CatalogEntry(
        id=sandbox_id,
        owner=None,
        spec=spec_to_json(BASH),
        state="running",
        created_at=0.0,
        expires_at=expires_at,
        directory="/nowhere",
        reserved_mb=300,
        vm_id="v" + sandbox_id,
        vmm_pid=pid,
        vmm_start_time=process_start_time(pid),
    )


def test_the_keeper_ends_vms_past_their_ttl_and_grace(tmp_path: Path) -> None:
    overdue = subprocess.Popen(["sleep", "60"], start_new_session=True)
    young = subprocess.Popen(["sleep", "60"], start_new_session=True)
    catalog = Catalog(tmp_path)
    try:
        now = time.time()
        catalog.put(keeper_entry("sbx_old", overdue.pid, now - 100))
        catalog.put(keeper_entry("sbx_new", young.pid, now - 10))  # within the grace
        assert keeper.sweep(catalog, grace=30, now=now) == 1
        assert overdue.wait(timeout=5) == -9 and young.poll() is None
        states = {e.id: (e.state, e.lost_reason) for e in catalog.entries()}
        assert states["sbx_new"] == ("running", None)
        assert states["sbx_old"][0] == "lost" and "keeper" in str(states["sbx_old"][1])
        # Nothing overdue and one VM alive: it keeps watching; once that one is gone, not.
        assert keeper.sweep(catalog, grace=30, now=now) == 1
        young.kill()
        young.wait(timeout=5)
        assert keeper.sweep(catalog, grace=30, now=now) == 0
    finally:
        for proc in (overdue, young):
            proc.kill()
            proc.wait(timeout=5)
        catalog.close()


def test_one_keeper_runs_per_state_dir_and_exits_when_idle(tmp_path: Path) -> None:
    held = keeper.try_lock(tmp_path)
    assert held is not None and keeper.try_lock(tmp_path) is None
    keeper.run(tmp_path, grace=1, interval=0.01)  # the lock is held: it returns at once
    import os

    os.close(held)
    started = time.monotonic()
    keeper.run(tmp_path, grace=1, interval=0.01)  # nothing to watch: it exits
    assert time.monotonic() - started < 5
    assert keeper.try_lock(tmp_path) is not None


async def test_a_reattached_sandbox_keeps_running_new_requests(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state")
    record = await first.sandboxes.create(BASH)
    await first.close()
    second = await durable(start_service, tmp_path / "state", on_stop="delete")
    results = await asyncio.gather(
        *(second.sandboxes.exec_command(record.id, f"echo {n}") for n in range(5))
    )
    assert sorted(r.stdout for r in results) == [f"{n}\n".encode() for n in range(5)]


def test_a_slot_whose_uid_still_runs_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A detached VMM holds its slot's lock itself, but could unlock it: its uid is checked too.
    busy = jailer.jail_plan.JAIL_ID_BASE
    monkeypatch.setattr(jailer, "uid_runs", lambda uid: uid == busy)
    lease = jailer.SlotLease.acquire(tmp_path, slots=2)
    assert lease.slot == 1
    with pytest.raises(Busy):
        jailer.SlotLease.acquire(tmp_path, slots=2)
    lease.release()


async def test_an_idle_stopped_sandbox_is_woken_at_re_attach(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await durable(start_service, tmp_path / "state")
    record = await first.sandboxes.create(BASH)
    (vm,) = fake_driver.live
    await vm.pause()  # as an idle sandbox's vCPUs are stopped
    await first.close()
    second = await durable(start_service, tmp_path / "state", on_stop="delete")
    ran = await second.sandboxes.exec_command(record.id, "echo awake")
    assert ran.stdout == b"awake\n"


def test_serve_takes_on_stop_retention_and_grace(tmp_path: Path) -> None:
    from fission.server.daemon import build_config

    def config(**options: Any) -> ServiceConfig:
        defaults: dict[str, Any] = {
            "config_file": None,
            "pools": [],
            "memory_budget_mb": None,
            "acquire_timeout": None,
            "socket": tmp_path / "s",
            "host": None,
            "port": None,
            "state_dir": tmp_path,
        }
        return build_config(**(defaults | options)).service

    service = config()
    assert (service.durable_sandboxes, service.on_stop) == (True, "keep")
    chosen = config(on_stop="pause", paused_retention=60.0, keeper_grace=5.0)
    assert (chosen.on_stop, chosen.paused_retention, chosen.keeper_grace) == ("pause", 60.0, 5.0)
    with pytest.raises(InvalidInput, match="--on-stop"):
        config(on_stop="explode")
    with pytest.raises(InvalidInput, match="--paused-retention"):
        config(paused_retention=-1.0)
