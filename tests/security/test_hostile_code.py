"""Hostile programs beyond the resource limits: each must end as reported and touch no host.

Every test runs real VMs. ``host_canary`` plants a secret file on the host and checks after the
test that it is unchanged and that this test process has no child left; ``no_leftovers``
(conftest) checks that no VMM process or VM file remains.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service, ServiceConfig
from fission.core.spec import MAX_CODE_BYTES, RunSpec
from fission.errors import InvalidInput
from tests.integration.helpers import run_code

pytestmark = pytest.mark.vm


def child_pids() -> set[int]:
    """Direct children of this test process."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found |= {int(pid) for pid in (task / "children").read_text().split()}
    return found


@pytest.fixture(autouse=True)
def host_canary() -> Iterator[Path]:
    """A secret file on the host that no guest may read or change, and no stray children."""
    path = Path(tempfile.mkdtemp(prefix="fission-canary-")) / "secret.txt"
    secret = secrets.token_hex(16)
    path.write_text(secret)
    before = path.stat()
    children = child_pids()
    yield path
    after = path.stat()
    assert path.read_text() == secret and after.st_mtime_ns == before.st_mtime_ns
    deadline = time.monotonic() + 10
    while child_pids() - children and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child_pids() - children == set(), "a process this test started outlived it"
    path.unlink()
    path.parent.rmdir()


@pytest.fixture
async def sandbox_service(tmp_path: Path) -> AsyncIterator[Service]:
    """An in-process service (no pools) for attacks that must leave the VM usable."""
    service = Service(ServiceConfig(tmp_path / "state", pools={}))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def test_orphaned_children_do_not_keep_a_run_alive() -> None:
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"  # a grandchild holding nothing open
        "    os._exit(0)\n"
        "print('main done')\n"
    )
    started = time.monotonic()
    result = await run_code("python", code, timeout=20)
    assert result.exit_code == 0 and result.stdout == b"main done\n"
    assert not result.timed_out
    assert time.monotonic() - started < 15, "the run waited for its orphan"


async def test_an_orphan_holding_stdout_does_not_keep_a_run_alive() -> None:
    result = await run_code("bash", "(sleep 1000 &) ; echo main done", timeout=20)
    assert result.stdout.startswith(b"main done") and not result.timed_out
    assert result.exit_code == 0


async def test_kill_minus_one_hits_only_the_program(sandbox_service: Service) -> None:
    manager = sandbox_service.sandboxes
    record = await manager.create(SandboxSpec(resolve_language("python")))
    try:
        hit = await manager.exec_command(record.id, "kill -9 -1; echo survived")
        assert hit.exit_code in (137, 0) or hit.signal == 9
        after = await manager.exec_command(record.id, "echo agent still answers")
        assert after.exit_code == 0 and after.stdout == b"agent still answers\n"
    finally:
        await manager.delete(record.id)


PROBES = r"""
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
facts = {}
def attempt(name, action):
    try:
        result = action()
        facts[name] = "allowed" if result is None or result == 0 else result
    except OSError as exc:
        facts[name] = errno.errorcode.get(exc.errno, exc.errno)
def syscall_errno(*args):
    if libc.syscall(*args) == -1:
        return errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())
    return "allowed"
facts["kvm"] = os.path.exists("/dev/kvm")
facts["host_canary"] = os.path.exists(CANARY)
facts["ptrace_agent"] = "allowed" if libc.ptrace(16, 1, 0, 0) == 0 else errno.errorcode.get(ctypes.get_errno())
facts["init_module"] = syscall_errno(175, None, 0, b"")
facts["finit_module"] = syscall_errno(313, -1, b"", 0)
attempt("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close())
attempt("mount", lambda: os.system("mount -t tmpfs x /tmp 2>/dev/null") or None)
attempt("kmsg", lambda: open("/dev/kmsg").read(1) and None)
attempt("mem", lambda: open("/dev/mem", "rb").read(1) and None)
attempt("reboot", lambda: syscall_errno(169, 0xfee1dead, 672274793, 0x1234567, None))
attempt("agent_files", lambda: os.listdir("/opt/fission") and None)
facts["uid"] = os.getuid()
print(json.dumps(facts))
"""


async def test_privileged_interfaces_are_closed_to_user_code(host_canary: Path) -> None:
    result = await run_code("python", PROBES.replace("CANARY", repr(str(host_canary))), timeout=30)
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["uid"] == 1000
    assert facts["kvm"] is False and facts["host_canary"] is False
    assert facts["ptrace_agent"] == "EPERM"
    assert facts["init_module"] == "EPERM" and facts["finit_module"] == "EPERM"
    assert facts["raw_socket"] == "EPERM" and facts["packet_socket"] == "EPERM"
    assert facts["mount"] != "allowed" and facts["reboot"] == "EPERM"
    assert facts["kmsg"] in ("EACCES", "EPERM") and facts["mem"] in ("EACCES", "EPERM", "ENOENT")


async def test_a_100_mb_program_is_refused_before_any_vm_starts() -> None:
    with pytest.raises(InvalidInput, match="bytes"):
        RunSpec(resolve_language("python"), "#" * (100 * 1024 * 1024))
    assert MAX_CODE_BYTES < 100 * 1024 * 1024


async def test_a_100_mb_argument_inside_the_guest_fails_cleanly() -> None:
    code = "import subprocess\nsubprocess.run(['/bin/true', 'x' * (100 * 1024 * 1024)])\n"
    result = await run_code("python", code, timeout=30, memory_mb=512)
    assert result.exit_code != 0 and b"Argument list too long" in result.stderr


async def test_many_hostile_runs_at_once_leave_the_host_as_it_was() -> None:
    attacks = [
        ("python", "while True: pass"),
        ("python", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
        ("python", "x = []\nwhile True: x.append(' ' * 10**6)"),
        ("bash", "yes"),
    ]
    busy, bomb, memory, flood = await asyncio.gather(
        *(run_code(lang, code, timeout=4) for lang, code in attacks)
    )
    assert busy.timed_out and busy.exit_code == 124
    assert bomb.timed_out and bomb.exit_code == 124
    assert memory.oom or memory.timed_out
    assert flood.truncated or flood.timed_out
