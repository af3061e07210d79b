"""The agent's file operations on a real VM: transfers both ways, listings, and the path rules.

One VM serves the whole module; each test uses names of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from fission.core.machines import Machine
from fission.errors import FileNotFound, InvalidInput, PathNotAllowed
from tests.integration.module_vm import boot_python, leftovers, run

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]
BIG = 20 * 1024 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def machine(runtime_dir: Path) -> AsyncIterator[Machine]:
    vm = await boot_python()
    try:
        yield vm
    finally:
        await vm.destroy()
    assert leftovers(runtime_dir, None) == ([], [])


@pytest.fixture(autouse=True)
def no_leftovers(runtime_dir: Path, machine: Machine) -> Iterator[None]:
    """Overrides the session check: the module's VM stays between tests, nothing else may."""
    yield
    assert leftovers(runtime_dir, machine) == ([], [])


async def read_all(machine: Machine, path: str) -> bytes:
    return b"".join([chunk async for chunk in machine.agent.read_file(path, timeout=60)])


async def test_a_20_mb_file_goes_in_and_out_intact(machine: Machine) -> None:
    data = os.urandom(BIG)
    digest = hashlib.sha256(data).hexdigest()
    started = time.monotonic()
    info = await machine.agent.write_file("transfer/in.bin", data, timeout=120)
    write_s = time.monotonic() - started
    assert (info.path, info.name, info.kind, info.size, info.mode) == (
        "transfer/in.bin",
        "in.bin",
        "file",
        BIG,
        0o644,
    )
    check = "import hashlib, os\np = 'transfer/in.bin'\nprint(hashlib.sha256(open(p, 'rb').read()).hexdigest(), os.stat(p).st_uid)"
    ran = await run(machine, check)
    assert ran.stdout.split() == [digest.encode(), b"1000"]

    make = "import hashlib, os\nd = os.urandom(20 * 1024 * 1024)\nopen('/tmp/out.bin', 'wb').write(d)\nprint(hashlib.sha256(d).hexdigest())"
    made = await run(machine, make)
    started = time.monotonic()
    back = hashlib.sha256()
    size = 0
    async for chunk in machine.agent.read_file("/tmp/out.bin", timeout=120):
        back.update(chunk)
        size += len(chunk)
    read_s = time.monotonic() - started
    assert (size, back.hexdigest().encode()) == (BIG, made.stdout.strip())
    print(f"\n20 MB: write {BIG / 1e6 / write_s:.1f} MB/s, read {BIG / 1e6 / read_s:.1f} MB/s")


async def test_write_takes_an_async_iterable_and_a_mode(machine: Machine) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([i]) * 300_000

    info = await machine.agent.write_file("/data/stream.bin", pieces(), mode=0o600, timeout=60)
    assert (info.path, info.size, info.mode) == ("/data/stream.bin", 1_500_000, 0o600)
    assert await read_all(machine, "/data/stream.bin") == b"".join(
        bytes([i]) * 300_000 for i in range(5)
    )
    # An empty file, and overwriting replaces the whole content.
    assert (await machine.agent.write_file("/data/stream.bin", b"", timeout=10)).size == 0
    assert await read_all(machine, "/data/stream.bin") == b""


async def test_mkdir_list_stat_remove(machine: Machine) -> None:
    agent = machine.agent
    made = await agent.make_dir("tree/a/b", timeout=10)
    assert (made.path, made.name, made.kind, made.mode) == ("tree/a/b", "b", "dir", 0o755)
    assert (await agent.make_dir("tree/a/b", timeout=10)).kind == "dir"  # exists: fine
    await agent.write_file("tree/a/b/f.txt", b"hello", timeout=10)
    await agent.write_file("tree/a/g.txt", b"hi", timeout=10)
    listing = await agent.list_files("tree/a", timeout=10)
    assert [(i.path, i.name, i.kind, i.size) for i in listing] == [
        ("tree/a/b", "b", "dir", 4096),
        ("tree/a/g.txt", "g.txt", "file", 2),
    ]
    stat = await agent.stat_file("/home/sandbox/tree/a/b/f.txt", timeout=10)
    assert (stat.path, stat.size, stat.kind) == ("tree/a/b/f.txt", 5, "file")
    assert abs(stat.mtime - time.time()) < 120
    home = await agent.stat_file(".", timeout=10)
    assert (home.path, home.name, home.kind) == (".", "sandbox", "dir")
    data = await agent.stat_file("/data", timeout=10)
    assert (data.path, data.kind, data.mode) == ("/data", "dir", 0o755)
    with pytest.raises(InvalidInput, match="not empty"):
        await agent.remove_file("tree", timeout=10)
    await agent.remove_file("tree/a/g.txt", timeout=10)
    await agent.remove_file("tree", recursive=True, timeout=10)
    with pytest.raises(FileNotFound):
        await agent.stat_file("tree", timeout=10)
    assert "tree" not in [i.name for i in await agent.list_files(timeout=10)]


async def test_each_problem_has_its_own_error(machine: Machine) -> None:
    agent = machine.agent
    await agent.make_dir("problems/dir", timeout=10)
    await agent.write_file("problems/file", b"x", timeout=10)
    with pytest.raises(FileNotFound, match="no such file"):
        await read_all(machine, "problems/missing")
    with pytest.raises(FileNotFound):
        await agent.remove_file("problems/missing", timeout=10)
    with pytest.raises(InvalidInput, match="is a directory"):
        await read_all(machine, "problems/dir")
    with pytest.raises(InvalidInput, match="is a directory"):
        await agent.write_file("problems/dir", b"x", timeout=10)
    with pytest.raises(InvalidInput, match="not a directory"):
        await agent.make_dir("problems/file", timeout=10)
    with pytest.raises(InvalidInput, match="not a directory"):
        await agent.list_files("problems/file", timeout=10)
    with pytest.raises(InvalidInput, match="cannot remove"):
        await agent.remove_file("/tmp", recursive=True, timeout=10)
    with pytest.raises(InvalidInput, match="mode"):
        await agent.write_file("problems/m", b"x", mode=0o4755, timeout=10)
    # The agent goes on serving after every refusal.
    assert (await agent.stat_file("problems/file", timeout=10)).size == 1


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "../sandbox/../../etc/passwd",
        "/etc/passwd",
        "/proc/self/environ",
        "/",
        "/home",
        "/data/../etc/shadow",
        "/tmp/../etc/shadow",
        "/home/sandbox/../../etc/passwd",
        "/home/sandboxed",
    ],
)
async def test_paths_outside_the_allowed_roots_are_refused(machine: Machine, path: str) -> None:
    agent = machine.agent
    with pytest.raises(PathNotAllowed):
        await read_all(machine, path)
    with pytest.raises(PathNotAllowed):
        await agent.stat_file(path, timeout=10)
    with pytest.raises(PathNotAllowed):
        await agent.write_file(path, b"owned", timeout=10)


async def test_the_guest_refuses_escapes_the_host_did_not_catch(machine: Machine) -> None:
    """Symlinks planted by user code: only the guest can see where they lead."""
    plant = (
        "import os\n"
        "os.symlink('/etc', 'link')\n"
        "os.symlink('/proc/self/root', 'procroot')\n"
        "os.symlink('../../etc/passwd', 'climb')\n"
        "os.symlink('/tmp', '/data/tmplink')\n"
        "os.makedirs('inside', exist_ok=True)\n"
        "open('inside/real.txt', 'w').write('inside')\n"
        "os.symlink('real.txt', 'inside/alias')\n"
    )
    assert (await run(machine, plant)).outcome.exit_code == 0
    agent = machine.agent
    for path in ("link/passwd", "procroot/etc/passwd", "climb", "/data/tmplink/x"):
        with pytest.raises(PathNotAllowed):
            await read_all(machine, path)
    for path in ("link/owned", "procroot/tmp/owned", "/data/tmplink/owned"):
        with pytest.raises(PathNotAllowed):
            await agent.write_file(path, b"owned", timeout=10)
    for path in ("link", "procroot/etc"):
        with pytest.raises(PathNotAllowed):
            await agent.list_files(path, timeout=10)
    with pytest.raises(PathNotAllowed):
        await agent.make_dir("link/newdir", timeout=10)
    with pytest.raises(PathNotAllowed):
        await agent.remove_file("link/hostname", timeout=10)
    # A symlink itself can be stat'ed and removed (its target is untouched)...
    assert (await agent.stat_file("link", timeout=10)).kind == "symlink"
    await agent.remove_file("link", timeout=10)
    # ...and one that stays inside is followed.
    assert await read_all(machine, "inside/alias") == b"inside"
    check = "import os\nprint(os.path.exists('/etc/owned'), os.path.exists('/etc/hostname'), os.path.exists('/tmp/owned'))"
    assert (await run(machine, check)).stdout == b"False True False\n"


async def test_file_operations_run_with_the_sandbox_users_rights(machine: Machine) -> None:
    """What the user's own code may not touch, the agent (root) does not touch for it either."""
    setup = (
        "import os\n"
        "open('locked', 'w').write('secret')\n"
        "os.chmod('locked', 0)\n"
        "os.makedirs('closed/inner', exist_ok=True)\n"
        "os.chmod('closed', 0)\n"
        "os.makedirs('readonly', exist_ok=True)\n"
        "os.chmod('readonly', 0o555)\n"
    )
    assert (await run(machine, setup)).outcome.exit_code == 0
    agent = machine.agent
    with pytest.raises(PathNotAllowed, match="permission denied"):
        await read_all(machine, "locked")
    with pytest.raises(PathNotAllowed, match="permission denied"):
        await agent.list_files("closed", timeout=10)
    with pytest.raises(PathNotAllowed, match="permission denied"):
        await agent.stat_file("closed/inner", timeout=10)
    with pytest.raises(PathNotAllowed, match="permission denied"):
        await agent.write_file("readonly/new.txt", b"x", timeout=10)
    # They stay the user's own: stat and remove work as they would for the user's code.
    assert (await agent.stat_file("locked", timeout=10)).mode == 0
    await agent.remove_file("locked", timeout=10)
    reopen = "import os\nos.chmod('closed', 0o755)\nos.chmod('readonly', 0o755)"
    assert (await run(machine, reopen)).outcome.exit_code == 0
    await agent.remove_file("closed", recursive=True, timeout=10)


async def test_a_full_disk_fails_cleanly_and_leaves_no_partial_file(machine: Machine) -> None:
    fill = (
        "import os\n"
        "st = os.statvfs('/tmp')\n"
        "free = st.f_bavail * st.f_frsize\n"
        "fd = os.open('/tmp/filler', os.O_CREAT | os.O_WRONLY, 0o600)\n"
        "os.posix_fallocate(fd, 0, free - 1024 * 1024)\n"
        "os.close(fd)\n"
        "print(free)\n"
    )
    assert (await run(machine, fill)).outcome.exit_code == 0
    agent = machine.agent
    try:
        with pytest.raises(InvalidInput, match="disk is full"):
            await agent.write_file("full/too-big.bin", os.urandom(8 * 1024 * 1024), timeout=60)
        assert [i.name for i in await agent.list_files("full", timeout=10)] == []
    finally:
        await agent.remove_file("/tmp/filler", timeout=10)
    assert (await agent.write_file("full/fits.bin", b"ok", timeout=10)).size == 2


async def test_file_operations_work_while_a_program_runs(machine: Machine) -> None:
    code = "import time\nprint('start', flush=True)\ntime.sleep(4)\nprint('end')"
    running = asyncio.create_task(run(machine, code))
    await asyncio.sleep(0.5)
    data = os.urandom(3 * 1024 * 1024)
    await machine.agent.write_file("during.bin", data, timeout=30)
    assert await read_all(machine, "during.bin") == data
    assert "during.bin" in [i.name for i in await machine.agent.list_files(timeout=10)]
    assert not running.done()
    ran = await running
    assert (ran.outcome.exit_code, ran.stdout) == (0, b"start\nend\n")
