"""Persistent sandboxes for real on the fake VMM driver: lifecycle, files, quotas, owners, ttl.

The ``SandboxManager`` of a real ``Service``; each sandbox's VM is a ``FakeVM`` whose files
live in its directory and survive a pause in the saved state, as a QEMU sandbox's disk does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.sandbox_spec import SandboxSpec, SandboxState
from fission.core.service import CLONE_MB, Service
from fission.errors import (
    Busy,
    FileNotFound,
    QuotaExceeded,
    SandboxNotFound,
    SandboxNotRunning,
)
from fission.vmm.base import DISK_NAME
from fission.vmm.fake import FakeDriver, FakeVM
from tests.unit.conftest import ServiceStarter, eventually

PYTHON = SandboxSpec(resolve_language("python"))
BASH = SandboxSpec(resolve_language("bash"))


def vm_of(fake_driver: FakeDriver) -> FakeVM:
    (vm,) = fake_driver.live
    return vm


async def read(service: Service, sandbox_id: str, path: str, owner: str | None = None) -> bytes:
    return b"".join([c async for c in service.sandboxes.read_file(sandbox_id, path, owner)])


async def test_create_run_exec_and_delete(service: Service, fake_driver: FakeDriver) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(PYTHON)
    assert record.state == SandboxState.RUNNING and service.budget.used_mb == CLONE_MB
    directory = service.journal.sandboxes_dir / record.id
    assert (directory / DISK_NAME).is_file()  # the sandbox's own disk lives in its directory
    ran = await sandboxes.run_code(record.id, "print(sum(range(10)))")
    assert (ran.stdout, ran.exit_code) == (b"45\n", 0)
    done = await sandboxes.exec_command(record.id, "echo made > f && cat f; exit 4")
    assert (done.stdout, done.exit_code) == (b"made\n", 4)
    argv = await sandboxes.exec_command(record.id, ["cat"], stdin=b"piped", cwd="/tmp")
    assert argv.stdout == b"piped"
    assert [vm.guest.execs[-1]["cwd"] for vm in fake_driver.live if vm.guest] == ["/tmp"]
    await sandboxes.delete(record.id)
    assert sandboxes.count() == 0 and not directory.exists()
    assert fake_driver.live == [] and service.budget.used_mb == 0
    with pytest.raises(SandboxNotFound):
        await sandboxes.run_code(record.id, "print(1)")


async def test_exec_takes_stdin_while_it_runs(service: Service) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(BASH)
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    seen: list[bytes] = []
    echoed = asyncio.Event()

    async def typed() -> AsyncIterator[bytes]:
        while (line := await lines.get()) is not None:
            yield line

    def on_output(stream: str, data: bytes) -> None:
        seen.append(data)
        echoed.set()

    command = "while read -r line; do echo got $line; done; echo eof"
    running = asyncio.create_task(
        sandboxes.exec_command(record.id, command, stdin=typed(), on_output=on_output)
    )
    lines.put_nowait(b"one\n")
    async with asyncio.timeout(10):
        await echoed.wait()  # answered while the command still runs: its input is live
    assert b"".join(seen) == b"got one\n" and not running.done()
    lines.put_nowait(b"two\n")
    lines.put_nowait(None)
    done = await asyncio.wait_for(running, 10)
    assert (done.exit_code, done.stdout) == (0, b"got one\ngot two\neof\n")
    await sandboxes.delete(record.id)


async def test_files_round_trip(service: Service, fake_driver: FakeDriver) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(BASH)
    info = await sandboxes.write_file(record.id, "data/in.txt", b"one\ntwo\n")
    assert (info.path, info.size) == ("data/in.txt", 8)
    assert (vm_of(fake_driver).home / "data" / "in.txt").read_bytes() == b"one\ntwo\n"
    counted = await sandboxes.exec_command(record.id, "wc -l < data/in.txt")
    assert counted.stdout.strip() == b"2"
    assert await read(service, record.id, "/home/sandbox/data/in.txt") == b"one\ntwo\n"
    assert [e.name for e in await sandboxes.list_files(record.id, "data")] == ["in.txt"]
    assert (await sandboxes.stat_file(record.id, "data")).kind == "dir"
    assert (await sandboxes.make_dir(record.id, "/tmp/a/b")).kind == "dir"
    await sandboxes.remove_file(record.id, "data", recursive=True)
    with pytest.raises(FileNotFound):
        await sandboxes.stat_file(record.id, "data")
    await sandboxes.delete(record.id)


async def test_pause_keeps_the_files_and_gives_the_memory_back(
    service: Service, fake_driver: FakeDriver
) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(BASH)
    await sandboxes.exec_command(record.id, "echo kept > notes.txt")
    first = vm_of(fake_driver)
    paused = await sandboxes.pause(record.id)
    assert paused.state == SandboxState.PAUSED and service.budget.used_mb == 0
    assert fake_driver.live == [] and service.journal.entries() == []
    with pytest.raises(SandboxNotRunning, match="resume it first"):
        await sandboxes.exec_command(record.id, "true")
    assert (await sandboxes.pause(record.id)).state == SandboxState.PAUSED  # idempotent
    resumed = await sandboxes.resume(record.id)
    assert resumed.state == SandboxState.RUNNING and service.budget.used_mb == CLONE_MB
    second = vm_of(fake_driver)
    assert second is not first and second.config.incoming is not None
    assert not second.config.incoming.exists()  # the saved state is used up
    assert (await sandboxes.exec_command(record.id, "cat notes.txt")).stdout == b"kept\n"
    assert len(service.journal.entries()) == 1
    await sandboxes.delete(record.id)


async def test_a_paused_sandbox_can_be_deleted(service: Service, fake_driver: FakeDriver) -> None:
    record = await service.sandboxes.create(BASH)
    await service.sandboxes.pause(record.id)
    await service.sandboxes.delete(record.id)
    assert service.sandboxes.count() == 0 and service.budget.used_mb == 0
    assert not (service.journal.sandboxes_dir / record.id).exists()


async def test_a_sandbox_expires_after_its_ttl(service: Service, fake_driver: FakeDriver) -> None:
    record = await service.sandboxes.create(SandboxSpec(resolve_language("bash"), ttl=1))
    await eventually(lambda: service.sandboxes.count() == 0, "the sandbox to expire", 5)
    with pytest.raises(SandboxNotFound):
        service.sandboxes.get(record.id)
    await eventually(lambda: not fake_driver.live, "its VM to be destroyed")
    assert service.budget.used_mb == 0


async def test_set_ttl_keeps_a_sandbox_alive(service: Service) -> None:
    record = await service.sandboxes.create(SandboxSpec(resolve_language("bash"), ttl=1))
    service.sandboxes.set_ttl(record.id, 60)
    await asyncio.sleep(1.5)
    assert service.sandboxes.get(record.id).state == SandboxState.RUNNING
    await service.sandboxes.delete(record.id)


async def test_a_key_over_its_sandbox_quota_is_refused(service: Service) -> None:
    sandboxes = service.sandboxes
    first = await sandboxes.create(BASH, owner="key_a", max_sandboxes=1)
    with pytest.raises(QuotaExceeded, match="--max-sandboxes"):
        await sandboxes.create(BASH, owner="key_a", max_sandboxes=1)
    other = await sandboxes.create(BASH, owner="key_b", max_sandboxes=1)  # a quota per key
    await sandboxes.delete(first.id, owner="key_a")
    again = await sandboxes.create(BASH, owner="key_a", max_sandboxes=1)  # the slot came back
    for record in (other, again):
        await sandboxes.delete(record.id)


async def test_owners_cannot_see_each_others_sandboxes(service: Service) -> None:
    sandboxes = service.sandboxes
    mine = await sandboxes.create(BASH, owner="key_a")
    theirs = await sandboxes.create(BASH, owner="key_b")
    for attempt in (
        lambda: sandboxes.run_code(mine.id, "echo", owner="key_b"),
        lambda: sandboxes.write_file(mine.id, "x", b"x", owner="key_b"),
        lambda: read(service, mine.id, "x", owner="key_b"),
        lambda: sandboxes.pause(mine.id, owner="key_b"),
        lambda: sandboxes.delete(mine.id, owner="key_b"),
    ):
        with pytest.raises(SandboxNotFound):
            await attempt()
    with pytest.raises(SandboxNotFound):
        sandboxes.get(mine.id, owner="key_b")
    assert [r.id for r in sandboxes.list_sandboxes(owner="key_a")[0]] == [mine.id]
    assert {r.id for r in sandboxes.list_sandboxes()[0]} == {mine.id, theirs.id}
    assert sandboxes.get(mine.id, owner="key_a").state == SandboxState.RUNNING


async def test_the_budget_refuses_a_sandbox_and_keeps_nothing(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service(memory_budget_mb=CLONE_MB)
    kept = await service.sandboxes.create(BASH, owner="key_a", max_sandboxes=5)
    with pytest.raises(Busy, match="--memory-budget"):
        await service.sandboxes.create(BASH, owner="key_a", max_sandboxes=5)
    assert service.sandboxes.count() == 1 and len(fake_driver.live) == 1
    assert [p.name for p in service.journal.sandboxes_dir.iterdir()] == [kept.id]
    # A paused sandbox holds no memory: the room it left can start another.
    await service.sandboxes.pause(kept.id)
    other = await service.sandboxes.create(BASH)
    with pytest.raises(Busy, match="pause or delete sandboxes"):
        await service.sandboxes.resume(kept.id)
    await service.sandboxes.delete(other.id)
    await service.sandboxes.resume(kept.id)


async def test_deleting_a_sandbox_ends_its_run_in_flight(
    service: Service, fake_driver: FakeDriver
) -> None:
    record = await service.sandboxes.create(BASH)
    running = asyncio.ensure_future(service.sandboxes.exec_command(record.id, "sleep 30"))
    vm = vm_of(fake_driver)
    await eventually(lambda: bool(vm.guest and vm.guest.runs), "the command to start")
    await service.sandboxes.delete(record.id)
    with pytest.raises(SandboxNotFound):
        await asyncio.wait_for(running, 10)
    assert fake_driver.live == []


async def test_a_wedged_guest_times_out_and_its_sandbox_is_destroyed(
    service: Service, fake_driver: FakeDriver
) -> None:
    record = await service.sandboxes.create(BASH)
    await vm_of(fake_driver).pause()  # the guest stops answering, as a hung VM would
    result = await service.sandboxes.exec_command(record.id, "echo never", timeout=0.2)
    assert result.timed_out and result.exit_code == 124
    await eventually(lambda: service.sandboxes.count() == 0, "the wedged sandbox to go")
    await eventually(lambda: not fake_driver.live, "its VM to be destroyed")


async def test_a_cold_sandbox_has_the_shape_it_asked_for(
    service: Service, fake_driver: FakeDriver
) -> None:
    spec = SandboxSpec(resolve_language("bash"), Limits(memory_mb=2048))
    record = await service.sandboxes.create(spec)
    assert vm_of(fake_driver).config.memory_mb == 2048 + 96 == service.budget.used_mb
    await service.sandboxes.pause(record.id)
    await service.sandboxes.resume(record.id)
    assert vm_of(fake_driver).config.memory_mb == 2048 + 96
    await service.sandboxes.delete(record.id)


async def test_close_destroys_every_sandbox(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service()
    await service.sandboxes.create(BASH)
    paused = await service.sandboxes.create(BASH)
    await service.sandboxes.pause(paused.id)
    await service.close()
    assert fake_driver.live == [] and list(service.journal.sandboxes_dir.iterdir()) == []
