"""The fake VMM driver against the real host AgentClient: protocol, runs, files, lifecycle."""

from __future__ import annotations

import ast
import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

import fission
from fission.agent.client import ExecOutcome, ExecRequest
from fission.core import snapshots
from fission.core.languages import resolve_language
from fission.core.machines import exec_request
from fission.core.sandbox_vm import pause_vm
from fission.core.spec import RunSpec
from fission.errors import ImagesNotBuilt, InvalidInput, PathNotAllowed, VMError, VMStartFailed
from fission.images.store import image_set
from fission.net.egress import attach
from fission.net.policy import NetworkPolicy
from fission.vmm.base import DISK_NAME, STATE_NAME, Machine, VMRequest
from fission.vmm.fake import FakeDriver, FakeVM
from tests.unit.conftest import eventually


@pytest_asyncio.fixture(loop_scope="function")
async def machine(
    fake_driver: FakeDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Machine]:
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "runtime"))
    config = await fake_driver.configure(VMRequest("bash", 1, 256, 512))
    machine = await fake_driver.start(config)
    yield machine
    await machine.destroy()


def fake(machine: Machine) -> FakeVM:
    assert isinstance(machine.vm, FakeVM)
    return machine.vm


def command(
    *argv: str,
    timeout: float = 10,
    output_limit: int = 1 << 20,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> ExecRequest:
    return ExecRequest(list(argv), env or {}, timeout, 0, 0, output_limit, cwd=cwd)


async def run(
    machine: Machine, request: ExecRequest, stdin: bytes | None = None
) -> tuple[ExecOutcome, dict[str, bytes]]:
    out = {"stdout": b"", "stderr": b""}

    def sink(stream: str, data: bytes) -> None:
        out[stream] += data

    outcome = await asyncio.wait_for(machine.agent.exec(request, sink, stdin), 20)
    return outcome, out


async def test_needs_no_images_and_says_hello_in_the_real_protocol(machine: Machine) -> None:
    with pytest.raises(ImagesNotBuilt):
        image_set("python")  # the cache is empty: nothing below needs it
    assert machine.agent.hello["agent"] == "fake"
    assert machine.vm.capabilities().name == "fake" and machine.vm.pid is None
    assert await machine.agent.prepare_snapshot(5) is False  # no fork server


async def test_a_python_run_uses_the_agents_request(machine: Machine) -> None:
    spec = RunSpec(resolve_language("python"), "import os\nprint(6 * 7, os.environ['HOME'])")
    outcome, out = await run(machine, exec_request(spec))
    assert outcome.exit_code == 0 and not outcome.timed_out
    assert out["stdout"] == f"42 {fake(machine).home}\n".encode()
    (request,) = fake(machine).guest.execs  # type: ignore[union-attr]
    assert request["argv"] == ["python3"] and request["script_name"] == "main.py"


async def test_stdin_cwd_env_and_exit_code(machine: Machine) -> None:
    (fake(machine).root / "tmp" / "x").write_text("in tmp")
    request = command("sh", "-c", 'cat; cat x; echo " $A" >&2; exit 3', env={"A": "1"}, cwd="/tmp")
    outcome, out = await run(machine, request, stdin=b"fed ")
    assert (outcome.exit_code, outcome.signal) == (3, 0)
    assert out == {"stdout": b"fed in tmp", "stderr": b" 1\n"}


async def test_the_timeout_kills_the_whole_run(machine: Machine) -> None:
    started = asyncio.get_running_loop().time()
    outcome, _ = await run(machine, command("sh", "-c", "sleep 30 & sleep 30", timeout=0.3))
    assert outcome.timed_out and (outcome.exit_code, outcome.signal) == (137, 9)
    assert asyncio.get_running_loop().time() - started < 5


async def test_output_is_capped(machine: Machine) -> None:
    outcome, out = await run(
        machine, command("sh", "-c", "head -c 5000 /dev/zero", output_limit=100)
    )
    assert outcome.output_truncated and out["stdout"] == b"\0" * 100


async def test_a_program_that_cannot_start_exits_127(machine: Machine) -> None:
    outcome, out = await run(machine, command("no-such-program-anywhere"))
    assert outcome.exit_code == 127 and b"cannot start program" in out["stderr"]


async def test_a_bad_request_is_refused_like_the_agent_does(machine: Machine) -> None:
    bash = RunSpec(resolve_language("bash"), "echo hi")
    with pytest.raises(InvalidInput, match="python only"):
        await run(machine, replace(exec_request(bash), context="default"))
    python = exec_request(RunSpec(resolve_language("python"), "print(1)"))
    outcome, out = await run(machine, replace(python, context="default"))
    assert out["stdout"] == b"1\n" and outcome.context_reset  # a context keeps no state here
    with pytest.raises(InvalidInput, match="no network"):
        await attach(machine.agent, NetworkPolicy.allowing(["example.com"]))


async def test_an_abandoned_run_is_killed(machine: Machine) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(machine.agent.exec(command("sleep", "30"), lambda *_: None), 0.3)
    guest = fake(machine).guest
    assert guest is not None
    await eventually(lambda: not guest.runs, "the KILL of the abandoned run")


async def test_files_go_through_the_agents_own_file_operations(machine: Machine) -> None:
    agent = machine.agent
    info = await agent.write_file("d/f.txt", b"hello", timeout=5)
    assert (info.path, info.size) == ("d/f.txt", 5)
    assert (fake(machine).home / "d" / "f.txt").read_bytes() == b"hello"
    assert [e.name for e in await agent.list_files("d", timeout=5)] == ["f.txt"]
    assert (
        b"".join([c async for c in agent.read_file("/home/sandbox/d/f.txt", timeout=5)]) == b"hello"
    )
    assert (await agent.make_dir("/data/x/y", timeout=5)).kind == "dir"
    await agent.remove_file("d", recursive=True, timeout=5)
    assert not (fake(machine).home / "d").exists()
    os.symlink("/etc", fake(machine).home / "out")
    for path in ("/etc/passwd", "../x", "out/passwd"):
        with pytest.raises(PathNotAllowed):
            await agent.stat_file(path, timeout=5)


async def test_a_read_stopped_early_is_cancelled_in_the_guest(machine: Machine) -> None:
    (fake(machine).home / "big").write_bytes(b"x" * (4 << 20))
    async for _ in machine.agent.read_file("big", timeout=5):
        break
    guest = fake(machine).guest
    assert guest is not None
    await eventually(lambda: guest.cancelled_transfers == 1, "the cancelled read")
    assert not guest.files.downloads


async def test_pause_holds_a_run_until_resume(machine: Machine) -> None:
    await machine.vm.pause()
    running = asyncio.ensure_future(run(machine, command("echo", "late")))
    await asyncio.sleep(0.3)
    assert not running.done()
    await machine.vm.resume()
    outcome, out = await running
    assert outcome.exit_code == 0 and out["stdout"] == b"late\n"


async def test_destroy_kills_programs_and_removes_everything_twice(
    fake_driver: FakeDriver, machine: Machine
) -> None:
    vm = fake(machine)
    pending = asyncio.ensure_future(run(machine, command("sh", "-c", "echo $$; exec sleep 30")))
    await eventually(
        lambda: bool(vm.guest and vm.guest.runs and next(iter(vm.guest.runs.values())).proc),
        "the run to start",
    )
    assert vm.guest is not None
    proc = next(iter(vm.guest.runs.values())).proc
    assert proc is not None
    await vm.destroy()
    await vm.destroy()
    with pytest.raises(VMError):
        await pending  # the guest end closed under the run, as when a VM dies
    assert proc.returncode is not None and not vm.config.workdir.exists()
    assert fake_driver.live == []


async def test_save_state_and_restore_keep_the_files(
    fake_driver: FakeDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "runtime"))
    box = tmp_path / "box"
    box.mkdir()
    spec = RunSpec(resolve_language("python"), "")
    config = await fake_driver.configure(snapshots.vm_request(spec, disk_dir=box))
    assert config.vcpus == snapshots.TEMPLATE_VCPUS and (box / DISK_NAME).is_file()
    machine = await fake_driver.start(config)
    await machine.agent.write_file("kept.txt", b"before the pause", timeout=5)
    await pause_vm(machine, box)
    assert (box / STATE_NAME).is_file() and not machine.vm.config.workdir.exists()
    resumed = await fake_driver.start(fake_driver.restored(config, box, keep_writes=True))
    try:
        data = b"".join([c async for c in resumed.agent.read_file("kept.txt", timeout=5)])
        assert data == b"before the pause"
    finally:
        await resumed.destroy()


async def test_a_broken_state_fails_the_start_and_leaves_nothing(
    fake_driver: FakeDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FISSION_RUNTIME_DIR", str(tmp_path / "runtime"))
    (tmp_path / STATE_NAME).write_bytes(b"not a tar")
    config = await fake_driver.configure(VMRequest("bash", 1, 256, 512))
    with pytest.raises(VMStartFailed):
        await fake_driver.start(fake_driver.restored(config, tmp_path, keep_writes=False))
    assert fake_driver.live == [] and not list((tmp_path / "runtime").iterdir())


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_only_tests_use_the_fake_and_core_names_no_vmm() -> None:
    package = Path(fission.__file__).parent
    for path in package.rglob("*.py"):
        imports = imported_modules(path)
        if path.parent.name != "vmm" or not path.name.startswith("fake"):
            assert not any(name.startswith("fission.vmm.fake") for name in imports), path
        if path.parent.name == "core":
            assert not any(name.startswith("fission.vmm.qemu") for name in imports), path
