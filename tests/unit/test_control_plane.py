"""The control plane for real on the fake VMM driver: Service, WarmPool, MemoryBudget, journal.

No /dev/kvm, QEMU or images: every VM is a ``FakeVM`` whose guest speaks the real agent
protocol, so pools, budgets, runs and the journal behave as with QEMU, in milliseconds.
Sandboxes are in ``test_control_plane_sandboxes``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fission.core import snapshots
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import GUEST_OVERHEAD_MB
from fission.core.pool import MemoryBudget, WarmPool
from fission.core.service import CLONE_MB, Service
from fission.core.spec import RunSpec
from fission.errors import Busy
from fission.vmm.base import Machine
from fission.vmm.fake import FakeDriver, FakeVM
from tests.unit.conftest import ServiceStarter, eventually

PYTHON = resolve_language("python")


def ready(service: Service, language: str = "python") -> int:
    return int(service.pools[language].status()["ready"])


# -- one-shot runs ------------------------------------------------------------------------------


async def test_a_run_gets_a_clone_of_its_own_and_gives_it_back(
    service: Service, fake_driver: FakeDriver
) -> None:
    result = await service.run(RunSpec(PYTHON, "import sys\nprint('hi'); sys.exit(3)"))
    assert (result.stdout, result.exit_code, result.timed_out) == (b"hi\n", 3, False)
    (vm,) = fake_driver.vms
    assert (vm.config.vcpus, vm.config.memory_mb) == (1, CLONE_MB)  # the template's shape
    await eventually(lambda: service.budget.used_mb == 0, "the run's memory to come back")
    assert not vm.config.workdir.exists() and service.journal.entries() == []


async def test_a_run_that_does_not_fit_the_template_boots_cold_in_the_budget(
    service: Service, fake_driver: FakeDriver
) -> None:
    limits = Limits(memory_mb=snapshots.TEMPLATE_CAPACITY_MB + 512)
    lease = await service.acquire(RunSpec(PYTHON, "", limits))
    machine = lease.machine
    assert machine.vm.config.memory_mb == limits.memory_mb + GUEST_OVERHEAD_MB
    assert service.budget.used_mb == limits.memory_mb + GUEST_OVERHEAD_MB
    assert [entry["workdir"] for entry in service.journal.entries()] == [
        str(machine.vm.config.workdir)
    ]
    await lease.release()
    assert service.budget.used_mb == 0 and service.journal.entries() == []


async def test_a_run_past_its_timeout_is_cut_off(service: Service) -> None:
    code = "import time\nprint('started', flush=True)\ntime.sleep(30)"
    spec = RunSpec(PYTHON, code, Limits(timeout=0.5))
    result = await service.run(spec)
    assert result.timed_out and result.exit_code == 124 and result.stdout == b"started\n"


async def test_output_and_stdin_go_through(service: Service) -> None:
    spec = RunSpec(PYTHON, "import sys\nprint(sys.stdin.read()[::-1])", stdin=b"olleh")
    chunks: list[tuple[str, bytes]] = []
    result = await service.run(spec, lambda stream, data: chunks.append((stream, data)))
    assert result.stdout == b"hello\n"
    assert {stream for stream, _ in chunks} == {"stdout"}  # streamed as it came
    assert b"".join(data for _, data in chunks) == b"hello\n"


async def test_the_budget_refuses_a_run_it_has_no_room_for(start_service: ServiceStarter) -> None:
    service = await start_service(memory_budget_mb=CLONE_MB - 1)
    with pytest.raises(Busy, match="--memory-budget"):
        await service.run(RunSpec(PYTHON, "print(1)"))
    assert service.budget.used_mb == 0


# -- warm pools -------------------------------------------------------------------------------


async def test_a_pool_fills_serves_and_refills(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service(pools={"python": 2})
    await eventually(lambda: ready(service) == 2, "the pool to fill")
    warmed = [vm.guest.execs for vm in fake_driver.live if vm.guest is not None]
    assert all(execs[0]["script"] == PYTHON.warm_up for execs in warmed)  # each clone warmed
    result = await service.run(RunSpec(PYTHON, "print('from the pool')"))
    assert result.stdout == b"from the pool\n"
    await eventually(lambda: ready(service) == 2, "the pool to refill")
    status = service.pools["python"].status()
    assert (status["served"], status["created"], status["failed"]) == (1, 3, 0)
    assert service.budget.used_mb == 2 * CLONE_MB
    assert len(fake_driver.live) == 2 and len(service.journal.entries()) == 2


async def test_a_pool_stops_at_the_budget_and_answers_busy(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service(
        pools={"python": 3}, memory_budget_mb=2 * CLONE_MB, acquire_timeout=0.2
    )
    await eventually(lambda: ready(service) == 2, "the pool to fill what the budget allows")
    await asyncio.sleep(0.1)
    assert service.pools["python"].status()["starting"] == 0 and len(fake_driver.live) == 2
    held = [await service.acquire(RunSpec(PYTHON, "")) for _ in range(2)]
    with pytest.raises(Busy, match="--pool python=N"):
        await service.acquire(RunSpec(PYTHON, ""))
    assert service.pools["python"].status()["busy"] == 1
    for lease in held:
        await lease.release()
    await eventually(lambda: ready(service) == 2, "the pool to refill once memory is back")
    assert service.budget.used_mb == 2 * CLONE_MB


async def test_a_pool_of_a_failing_factory_reports_it_and_keeps_no_memory(
    fake_driver: FakeDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fission.core.pool.RETRY_DELAY", 0.01)
    attempts = 0

    async def broken() -> Machine:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("the warm-up failed")

    budget = MemoryBudget(4 * CLONE_MB)
    pool = WarmPool("python", 2, budget, CLONE_MB, broken)
    pool.start()
    try:
        await eventually(lambda: attempts >= 4, "the pool to retry")
        status = pool.status()
        assert status["ready"] == 0 and status["failed"] >= 4
        assert status["last_error"] == "the warm-up failed"
    finally:
        await pool.close()
    assert budget.used_mb == 0


async def test_close_destroys_the_pooled_vms(
    start_service: ServiceStarter, fake_driver: FakeDriver
) -> None:
    service = await start_service(pools={"python": 2})
    await eventually(lambda: ready(service) == 2, "the pool to fill")
    workdirs = [vm.config.workdir for vm in fake_driver.live]
    await service.close()
    assert fake_driver.live == [] and not any(path.exists() for path in workdirs)
    assert service.budget.used_mb == 0


async def test_a_restarted_service_reconciles_what_the_last_one_left(
    start_service: ServiceStarter, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    first = await start_service()
    machine = (await first.acquire(RunSpec(PYTHON, ""))).machine
    assert isinstance(machine.vm, FakeVM) and machine.vm.config.workdir.is_dir()
    # A crash: nothing is released. The next daemon on the same state dir cleans up.
    second = await start_service(state_dir=first.config.state_dir)
    assert second.reconciled == {"killed": 0, "removed": 1, "cgroups": 0}
    assert not machine.vm.config.workdir.exists() and second.journal.entries() == []
    await machine.destroy()


# -- the Service API: uploads and downloads, and the REST door in front of it ------------------


async def test_uploads_go_in_before_the_program_and_downloads_come_back(
    service: Service, fake_driver: FakeDriver
) -> None:
    from fission.core.transfers import Upload

    # The fake guest maps /home/sandbox into its private root, which the program sees as $HOME.
    code = "import os, shutil; os.chdir(os.environ['HOME']); shutil.copy('in.bin', 'out.bin')"
    payload = bytes(range(256)) * 1000
    result = await service.run(
        RunSpec(PYTHON, code + "; print('copied')"),
        uploads=[Upload("/home/sandbox/in.bin", payload)],
        downloads=["/home/sandbox/out.bin"],
    )
    assert (result.exit_code, result.stdout) == (0, b"copied\n"), result.stderr
    assert result.files == {"/home/sandbox/out.bin": payload}
    await eventually(lambda: service.budget.used_mb == 0, "the run's memory to come back")


async def test_bad_transfers_are_refused_before_any_vm_starts(
    service: Service, fake_driver: FakeDriver
) -> None:
    from fission.core.transfers import Upload
    from fission.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not a path"):
        await service.run(RunSpec(PYTHON, "print(1)"), uploads=[Upload("", b"x")])
    with pytest.raises(InvalidInput, match="not a path"):
        await service.run(RunSpec(PYTHON, "print(1)"), downloads=["/a\0b"])
    assert fake_driver.vms == []


async def test_a_missing_download_fails_the_run_and_frees_its_vm(
    service: Service, fake_driver: FakeDriver
) -> None:
    from fission.errors import FissionError

    with pytest.raises(FissionError):
        await service.run(RunSpec(PYTHON, "print(1)"), downloads=["/data/never-written"])
    await eventually(lambda: service.budget.used_mb == 0, "the run's memory to come back")
    assert fake_driver.live == []


async def test_the_rest_door_carries_uploads_and_downloads(
    service: Service, fake_driver: FakeDriver
) -> None:
    import base64
    import json

    import httpx

    from fission.server.app import create_app

    app = create_app(service)  # the lifespan is not run: the service is already started
    code = "import os; os.chdir(os.environ['HOME']); print(open('in.txt').read().upper())"
    body = {
        "code": code + "; open('o.txt', 'w').write('ok')",
        "uploads": [{"path": "in.txt", "data_b64": base64.b64encode(b"hello").decode()}],
        "downloads": ["o.txt"],
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        response = await client.post("/v1/run", json=body)
        lines = [json.loads(line) for line in response.text.splitlines()]
        bad = await client.post(
            "/v1/run", json={"code": "1", "uploads": [{"path": "/x", "data_b64": "%%%"}]}
        )
    assert response.status_code == 200
    kinds = [line["type"] for line in lines]
    outputs = kinds.count("output")  # the output may come in more than one chunk
    assert outputs >= 1 and kinds == ["output"] * outputs + ["file", "result"]
    assert "".join(line["data"] for line in lines[:outputs]) == "HELLO\n"
    assert base64.b64decode(lines[outputs]["data_b64"]) == b"ok"
    assert bad.status_code == 400 and "base64" in bad.json()["error"]["message"]
    await eventually(lambda: service.budget.used_mb == 0, "the run's memory to come back")


# -- private services (embedded runs, MCP): their own state dir, nothing left behind -----------


async def test_embedded_services_one_after_another_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_driver: FakeDriver
) -> None:
    from dataclasses import replace

    from fission.core.service import embedded_config, private_service

    runtime = tmp_path / "runtime"
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(runtime))

    def config(state_dir: Path) -> Any:
        return replace(embedded_config(state_dir), driver=fake_driver)

    for _ in range(3):  # each starts from the same runtime dir: no nesting, no leftovers
        async with private_service("embedded-", config) as service:
            assert service.config.state_dir.parent == runtime
            result = await service.run(RunSpec(PYTHON, "print(7)"))
            assert result.stdout == b"7\n"
        assert sorted(p.name for p in runtime.iterdir()) == []
    assert fake_driver.live == []


async def test_a_dead_embedded_process_is_swept_with_its_vms_outside_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import subprocess

    from fission.core.state_dirs import sweep_stale

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    state = runtime / f"embedded-{int(dead.stdout)}"
    (state / "journal").mkdir(parents=True)
    vm_dir = runtime / "vm-0123456789ab"  # an embedded VM's workdir, in the shared runtime dir
    vm_dir.mkdir()
    (vm_dir / "console.log").write_text("x")
    entry = {"pid": None, "start_time": None, "workdir": str(vm_dir)}
    (state / "journal" / "0123456789ab.json").write_text(json.dumps(entry))
    unrelated = runtime / "vm-not-journalled"
    unrelated.mkdir()
    assert sweep_stale(runtime, "embedded-") == [state]
    assert sorted(p.name for p in runtime.iterdir()) == ["vm-not-journalled"]


async def test_embedded_services_at_once_in_one_process_have_their_own_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_driver: FakeDriver
) -> None:
    from dataclasses import replace

    from fission.core.service import embedded_config, private_service

    runtime = tmp_path / "runtime"
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(runtime))

    def config(state_dir: Path) -> Any:
        return replace(embedded_config(state_dir), driver=fake_driver)

    async def one(n: int) -> bytes:
        async with private_service("embedded-", config, several=True) as service:
            return (await service.run(RunSpec(PYTHON, f"print({n})"))).stdout

    assert await asyncio.gather(*(one(n) for n in range(4))) == [b"0\n", b"1\n", b"2\n", b"3\n"]
    assert list(runtime.iterdir()) == [] and fake_driver.live == []


async def test_every_route_that_runs_code_refuses_a_missing_or_forged_key(
    service: Service, fake_driver: FakeDriver, tmp_path: Path
) -> None:
    import httpx

    from fission.auth.keys import KeyStore
    from fission.server.app import create_app

    db = tmp_path / "keys.sqlite3"
    with KeyStore(db) as store:
        _, key = store.create("ci")
    app = create_app(service, keys_db=db)  # a TCP listener's app: every route needs a key
    bodies = {
        "/v1/run": {"code": "print(1)"},
        "/v1/install": {"packages": ["x"], "command": "true"},
        "/v1/repo": {"url": None, "command": "true"},
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fission") as client:
        for route, body in bodies.items():
            missing = await client.post(route, json=body)
            forged = await client.post(
                route, json=body, headers={"Authorization": "Bearer fsn_" + "0" * 40}
            )
            assert (missing.status_code, forged.status_code) == (401, 401), route
        allowed = await client.post(
            "/v1/repo",
            json={"command": "echo ok", "files": []},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert allowed.status_code == 200 and '"exit_code": 0' in allowed.text
    await eventually(lambda: service.budget.used_mb == 0, "the run's memory to come back")
