"""Idle VMs on real QEMU: pooled clones wait with their vCPUs stopped (QMP says ``paused``), and a
sandbox left alone is stopped; a run on either works and sees the right wall clock."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service, ServiceConfig, private_service
from fission.core.spec import RunSpec
from fission.vmm.base import Machine
from fission.vmm.qemu import QemuVM

pytestmark = pytest.mark.vm

PYTHON = resolve_language("python")
CLOCK = "import time; print(time.time())"


async def qmp_status(machine: Machine) -> str:
    assert isinstance(machine.vm, QemuVM)
    answer = await machine.vm.qmp("query-status")
    assert isinstance(answer, dict)
    return str(answer["status"])


async def wait_until(condition, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g} s"
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture(loop_scope="function")
async def service() -> AsyncIterator[Service]:
    """A private Service with one pooled Python clone; idle sandboxes stop after a second."""

    def config(state_dir: Path) -> ServiceConfig:
        return ServiceConfig(
            state_dir=state_dir, pools={"python": 1}, memory_budget_mb=4096, sandbox_idle_stop=1.0
        )

    runtime = os.environ["FISSION_RUNTIME_DIR"]  # a started Service points it at its own dir
    try:
        async with private_service("idle-test-", config) as started:
            yield started
    finally:
        os.environ["FISSION_RUNTIME_DIR"] = runtime


async def test_a_pooled_vm_waits_paused_and_serves_a_run(service: Service) -> None:
    pool = service.pools["python"]

    async def ready() -> bool:
        return bool(pool.waiting_machines())

    await wait_until(ready, "the pool to fill")
    (machine,) = pool.waiting_machines()
    assert await qmp_status(machine) == "paused"
    assert machine.vm.cpu_seconds() is not None
    before = machine.vm.cpu_seconds()
    await asyncio.sleep(3.0)  # long enough for a running guest's clock ticks to show
    assert machine.vm.cpu_seconds() == before  # no CPU at all while it waits
    lease = await service.acquire(RunSpec(PYTHON, ""))
    assert lease.machine is machine and await qmp_status(machine) == "running"
    result = await service.run(RunSpec(PYTHON, CLOCK), lease=lease)
    assert result.exit_code == 0, result.stderr
    assert abs(float(result.stdout) - time.time()) < 2.0  # the clock did not stop with it


async def test_an_idle_sandbox_is_stopped_and_its_next_run_has_the_right_clock(
    service: Service,
) -> None:
    sandboxes = service.sandboxes
    record = await sandboxes.create(SandboxSpec(PYTHON))
    try:
        first = await sandboxes.run_code(record.id, CLOCK)
        assert abs(float(first.stdout) - time.time()) < 2.0, first.stderr
        box = sandboxes._box(record.id, None)
        assert box.machine is not None
        machine = box.machine

        async def stopped() -> bool:
            return await qmp_status(machine) == "paused"

        await wait_until(stopped, "the idle sandbox to be stopped", timeout=30)
        await asyncio.sleep(5.0)  # a guest clock that stood still would now be 5 s late
        later = await sandboxes.run_code(record.id, CLOCK)
        assert later.exit_code == 0, later.stderr
        assert abs(float(later.stdout) - time.time()) < 2.0
        assert await qmp_status(machine) == "running"
        listed = await sandboxes.exec_command(record.id, "echo still here")
        assert listed.stdout == b"still here\n"
    finally:
        await sandboxes.delete(record.id)
