"""Idle VMs cost nothing, on the fake VMM driver: pooled clones wait with their vCPUs stopped, an
idle sandbox's VM is stopped and woken by its next call, and a woken guest gets the wall clock.

A fake VM's ``pause`` freezes its guest (no frame is read, its programs are SIGSTOPped) as QMP
``stop`` freezes a QEMU guest; every INIT the guest receives (the clock and a seed) is recorded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import pytest_asyncio

from fission.core import idle, orchestrator
from fission.core.languages import resolve_language
from fission.core.pool import MemoryBudget, WarmPool
from fission.core.sandbox_spec import SandboxSpec, SandboxState
from fission.core.service import CLONE_MB, Service
from fission.core.spec import RunSpec
from fission.vmm.base import Machine
from fission.vmm.fake import FakeDriver, FakeVM
from tests.unit.conftest import ServiceStarter, eventually

PYTHON = resolve_language("python")
SANDBOX = SandboxSpec(PYTHON)


def guest_of(machine: Machine):  # type: ignore[no-untyped-def]
    assert isinstance(machine.vm, FakeVM) and machine.vm.guest is not None
    return machine.vm.guest


def fake_vm(driver: FakeDriver) -> FakeVM:
    (vm,) = driver.live
    assert vm.guest is not None
    return vm


# -- warm pools -----------------------------------------------------------------------------------


async def test_pooled_vms_wait_stopped_and_a_run_gets_a_running_one_with_the_clock_set(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service(pools={"python": 2})
    pool = service.pools["python"]
    await eventually(lambda: pool.status()["ready"] == 2, "the pool to fill")
    assert all(vm.guest is not None and vm.guest.paused for vm in fake_driver.live)
    lease = await service.acquire(RunSpec(PYTHON, ""))
    guest = guest_of(lease.machine)
    assert not guest.paused
    # INIT at restore, then INIT again at wake: the clock of the moment the run took it.
    assert len(guest.inits) == 2
    assert abs(guest.inits[-1]["time_ns"] / 1e9 - time.time()) < 5
    assert guest.inits[0]["seed"] != guest.inits[1]["seed"]
    result = await service.run(RunSpec(PYTHON, "print('ran')"), lease=lease)
    assert result.stdout == b"ran\n"
    others = [vm for vm in fake_driver.live if vm.guest is not guest]
    assert others and all(vm.guest is not None and vm.guest.paused for vm in others)


async def test_queued_acquirers_get_clones_without_a_warm_up(
    fake_driver: FakeDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path))
    warmed: list[Machine] = []

    async def warm(machine: Machine) -> None:
        warmed.append(machine)
        await orchestrator.warm_up(machine, PYTHON)

    pool = WarmPool(
        "python",
        1,
        MemoryBudget(8 * CLONE_MB),
        CLONE_MB,
        lambda: orchestrator.clone(PYTHON, fake_driver),
        warm=warm,
    )
    pool.start()
    try:
        # Two runs wait before any clone is ready: neither waits for a warm-up.
        first, second = await asyncio.gather(pool.acquire(10), pool.acquire(10))
        assert pool.status()["unwarmed"] == 2 and warmed == []
        assert guest_of(first).execs == [] and guest_of(second).execs == []
        for machine in (first, second):
            await pool.release(machine)
        # Nobody waits now: the next clone is warmed before it is pooled.
        await eventually(lambda: pool.status()["ready"] == 1, "the pool to refill")
        assert len(warmed) == 1 and guest_of(warmed[0]).execs[0]["script"] == PYTHON.warm_up
        assert guest_of(warmed[0]).paused
    finally:
        await pool.close()
    assert fake_driver.live == []


async def test_a_pooled_vm_that_died_while_stopped_is_replaced(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service(pools={"python": 2})
    pool = service.pools["python"]
    await eventually(lambda: pool.status()["ready"] == 2, "the pool to fill")
    doomed = pool.waiting_machines()[0].vm  # the next one a run would get
    await doomed.destroy()  # e.g. the VMM was killed behind the daemon's back
    result = await service.run(RunSpec(PYTHON, "print('still served')"))
    assert result.stdout == b"still served\n"
    assert pool.status()["failed"] == 1
    await eventually(lambda: pool.status()["ready"] == 2, "the pool to refill")


# -- sandboxes --------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="function")
async def quick_idle(start_service: ServiceStarter, monkeypatch: pytest.MonkeyPatch) -> Service:
    """A Service whose sandboxes stop after 50 ms with nothing in flight, checked every 10 ms."""
    monkeypatch.setattr("fission.core.sandbox_lifetimes.EXPIRY_INTERVAL", 0.01)
    return await start_service(sandbox_idle_stop=0.05)


async def test_an_idle_sandbox_is_stopped_and_its_next_call_wakes_it_with_the_clock(
    quick_idle: Service, fake_driver: FakeDriver
) -> None:
    sandboxes = quick_idle.sandboxes
    record = await sandboxes.create(SANDBOX)
    vm = fake_vm(fake_driver)
    assert vm.guest is not None
    await eventually(lambda: vm.guest is not None and vm.guest.paused, "the idle sandbox to stop")
    assert sandboxes.get(record.id).state == SandboxState.RUNNING  # stopped, not paused to disk
    inits = len(vm.guest.inits)
    result = await sandboxes.run_code(record.id, "import time; print(time.time())")
    assert abs(float(result.stdout) - time.time()) < 5
    assert len(vm.guest.inits) == inits + 1  # woken with the wall clock of the moment
    assert abs(vm.guest.inits[-1]["time_ns"] / 1e9 - time.time()) < 5
    await eventually(lambda: vm.guest is not None and vm.guest.paused, "it to stop again")
    listed = await sandboxes.list_files(record.id, "/tmp")  # a file call wakes it too
    assert isinstance(listed, list) and not vm.guest.paused
    await sandboxes.delete(record.id)


async def test_a_sandbox_is_not_stopped_while_a_call_is_in_flight(
    quick_idle: Service, fake_driver: FakeDriver
) -> None:
    sandboxes = quick_idle.sandboxes
    record = await sandboxes.create(SANDBOX)
    vm = fake_vm(fake_driver)
    code = "import time; time.sleep(0.5); print('done')"
    run = asyncio.create_task(sandboxes.run_code(record.id, code))
    paused_while_running = False
    while not run.done():
        paused_while_running |= vm.guest is not None and vm.guest.paused
        await asyncio.sleep(0.01)
    assert (await run).stdout == b"done\n" and not paused_while_running
    await eventually(lambda: vm.guest is not None and vm.guest.paused, "it to stop afterwards")
    await sandboxes.delete(record.id)


async def test_a_sandbox_busy_on_its_own_keeps_running(
    quick_idle: Service, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = await quick_idle.sandboxes.create(SANDBOX)
    vm = fake_vm(fake_driver)
    used = [0.0]

    def cpu_seconds() -> float:
        return used[0]

    monkeypatch.setattr(vm, "cpu_seconds", cpu_seconds)
    started = time.monotonic()
    while time.monotonic() - started < 0.4:  # a core's worth of CPU with nothing in flight
        used[0] = time.monotonic() - started
        assert vm.guest is not None and not vm.guest.paused
        await asyncio.sleep(0.01)
    # The background work ends: the VM's CPU stands still, and it is stopped.
    await eventually(lambda: vm.guest is not None and vm.guest.paused, "the quiet VM to stop")
    await quick_idle.sandboxes.delete(record.id)


async def test_pausing_a_stopped_sandbox_saves_it_and_resume_brings_it_back(
    quick_idle: Service, fake_driver: FakeDriver
) -> None:
    sandboxes = quick_idle.sandboxes
    record = await sandboxes.create(SANDBOX)
    await sandboxes.write_file(record.id, "kept.txt", b"kept")
    vm = fake_vm(fake_driver)
    await eventually(lambda: vm.guest is not None and vm.guest.paused, "the idle sandbox to stop")
    assert (await sandboxes.pause(record.id)).state == SandboxState.PAUSED
    assert fake_driver.live == []
    await sandboxes.resume(record.id)
    result = await sandboxes.exec_command(record.id, "cat kept.txt")
    assert result.stdout == b"kept"
    await sandboxes.delete(record.id)


async def test_a_service_can_keep_idle_sandboxes_running(
    start_service: ServiceStarter, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fission.core.sandbox_lifetimes.EXPIRY_INTERVAL", 0.01)
    service = await start_service(sandbox_idle_stop=None)
    record = await service.sandboxes.create(SANDBOX)
    await asyncio.sleep(0.2)
    vm = fake_vm(fake_driver)
    assert vm.guest is not None and not vm.guest.paused
    await service.sandboxes.delete(record.id)


# -- the decision, on its own ---------------------------------------------------------------------


class Meter:
    """A VM stand-in whose CPU reading the test sets."""

    def __init__(self) -> None:
        self.used: float | None = 0.0

    def cpu_seconds(self) -> float | None:
        return self.used


def test_a_vm_is_due_only_after_the_quiet_period_and_two_calm_looks() -> None:
    state = idle.IdleState(after=2.0)
    vm = Meter()
    assert not state.due(vm, quiet=1.0, now=10.0)  # type: ignore[arg-type]
    assert not state.due(vm, quiet=2.5, now=11.0)  # type: ignore[arg-type]  # first look
    vm.used = 0.4  # 40 % of a core in the last second: working alone
    assert not state.due(vm, quiet=3.5, now=12.0)  # type: ignore[arg-type]
    vm.used = 0.41
    assert state.due(vm, quiet=4.5, now=13.0)  # type: ignore[arg-type]
    assert state.stopping and not state.due(vm, quiet=5.0, now=14.0)  # type: ignore[arg-type]


def test_a_call_in_between_restarts_the_cpu_window() -> None:
    state = idle.IdleState(after=1.0)
    vm = Meter()
    assert not state.due(vm, quiet=1.5, now=1.0)  # type: ignore[arg-type]
    assert not state.due(vm, quiet=0.0, now=2.0)  # type: ignore[arg-type]  # a call ran
    vm.used = 5.0  # the call's own CPU is not held against the quiet period after it
    assert not state.due(vm, quiet=1.5, now=3.5)  # type: ignore[arg-type]
    assert state.due(vm, quiet=2.0, now=4.0)  # type: ignore[arg-type]


def test_a_vm_whose_cpu_is_unknown_is_due_after_the_quiet_period() -> None:
    vm = Meter()
    vm.used = None
    assert idle.IdleState(after=1.0).due(vm, quiet=1.0)  # type: ignore[arg-type]
    assert not idle.IdleState(after=None).due(vm, quiet=100.0)  # type: ignore[arg-type]


async def test_a_call_racing_the_delete_of_a_stopped_sandbox_says_not_found(
    quick_idle: Service, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fission.errors import SandboxNotFound

    sandboxes = quick_idle.sandboxes
    record = await sandboxes.create(SANDBOX)
    vm = fake_vm(fake_driver)
    await eventually(lambda: vm.guest is not None and vm.guest.paused, "the idle sandbox to stop")
    waking, deleted = asyncio.Event(), asyncio.Event()
    real_wake = idle.wake

    async def slow_wake(machine: Machine) -> None:
        waking.set()
        await deleted.wait()
        await real_wake(machine)

    monkeypatch.setattr(idle, "wake", slow_wake)
    run = asyncio.create_task(sandboxes.run_code(record.id, "print(1)"))
    await waking.wait()  # the call is in, waking the VM, when the sandbox is deleted
    await sandboxes.delete(record.id)
    deleted.set()
    with pytest.raises(SandboxNotFound):
        await run
