"""Hostile programs against each limit: each must end with the right status, host untouched."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from fission.core.execution import KILL_GRACE, execute
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import exec_request
from fission.core.orchestrator import boot
from fission.core.spec import RunSpec
from tests.integration.helpers import run_code

pytestmark = pytest.mark.vm


def host_process_count() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


async def test_busy_loop_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    result = await run_code("python", "while True:\n    pass\n", timeout=3)
    assert result.timed_out
    assert result.exit_code == 124
    # From program start to result: within timeout + 2 s (boot time is not the program's).
    assert (result.total_ms - result.boot_ms) / 1000 < 3 + 2
    assert time.monotonic() - started < 3 + 2 + result.boot_ms / 1000 + 1


async def test_sleep_forever_in_a_child_is_killed_at_the_timeout() -> None:
    result = await run_code("bash", "sleep 100000 & wait", timeout=2)
    assert result.timed_out and result.exit_code == 124


async def test_a_wedged_guest_is_stopped_by_the_host_deadline() -> None:
    """Freeze the guest's CPUs through QMP: only the host's own deadline can end the run."""
    spec = RunSpec(resolve_language("python"), "import time; time.sleep(1); print('late')",
                   Limits(timeout=2))
    vm, agent = await boot(spec)
    try:
        assert await vm.qmp("query-status") == {"status": "running", "singlestep": False,
                                                "running": True}
        await vm.qmp("stop")
        started = time.monotonic()
        result = (await execute(agent, exec_request(spec), diagnostics=vm.diagnostics)).result
        elapsed = time.monotonic() - started
    finally:
        await agent.close()
        await vm.destroy()
    assert result.timed_out and result.exit_code == 124
    assert result.stdout == b""
    assert spec.limits.timeout + KILL_GRACE - 0.5 < elapsed < spec.limits.timeout + KILL_GRACE + 1


async def test_fork_bomb_hits_the_pids_limit_and_the_timeout() -> None:
    before = host_process_count()
    code = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    result = await run_code("python", code, timeout=5, pids=64)
    assert result.timed_out and result.exit_code == 124
    # The bomb lived in the guest only: the host gained no processes (allow unrelated noise).
    assert host_process_count() - before < 10


async def test_pids_limit_caps_processes() -> None:
    code = ("import os, time\n"
            "n = 0\n"
            "try:\n"
            "    while True:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print(n, e.errno)\n")
    result = await run_code("python", code, timeout=30, pids=32)
    count, errno = (int(x) for x in result.stdout.split())
    assert errno == 11  # EAGAIN from the pids controller
    assert 20 <= count < 32
    assert result.exit_code == 0  # the main process ended; its children were killed with it


async def test_memory_bomb_is_reported_as_oom() -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 * 1024 * 1024))\n"
    result = await run_code("python", code, memory_mb=128, timeout=60)
    assert result.oom
    assert result.signal == 9 and result.exit_code == 137
    assert not result.timed_out


async def test_memory_within_the_limit_is_available() -> None:
    code = "b = bytearray(100 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])\nprint('ok')\n"
    result = await run_code("python", code, memory_mb=192, timeout=60)
    assert result.stdout == b"ok\n" and not result.oom


async def test_disk_filler_stops_at_the_disk_cap() -> None:
    code = ("import os\n"
            "written = 0\n"
            "try:\n"
            "    with open('/tmp/fill', 'wb') as f:\n"
            "        while True:\n"
            "            f.write(b'x' * (1 << 20)); f.flush(); os.fsync(f.fileno())\n"
            "            written += 1\n"
            "except OSError as e:\n"
            "    print(written, e.errno)\n")
    result = await run_code("python", code, disk_mb=64, timeout=120)
    written, errno = (int(x) for x in result.stdout.split())
    assert errno == 28  # ENOSPC
    assert 40 <= written <= 64


async def test_output_flood_is_truncated_at_the_cap() -> None:
    code = "import sys\nfor _ in range(40):\n    sys.stdout.write('x' * (1 << 19))\n"
    result = await run_code("python", code, output_limit_mb=1, timeout=60)
    assert result.truncated
    assert len(result.stdout) + len(result.stderr) == 1 << 20
    assert result.exit_code == 0


async def test_endless_output_flood_ends_at_the_timeout_with_capped_output() -> None:
    result = await run_code("bash", "yes flood", output_limit_mb=0.5, timeout=3)
    assert result.timed_out and result.truncated
    assert len(result.stdout) == 512 * 1024


async def test_runs_in_parallel_do_not_share_state() -> None:
    code = "import os, pathlib\np = pathlib.Path('/tmp/marker')\nprint(p.exists())\np.write_text('x')\nprint(os.urandom(8).hex())"
    first, second = await asyncio.gather(run_code("python", code), run_code("python", code))
    assert first.stdout.splitlines()[0] == b"False"
    assert second.stdout.splitlines()[0] == b"False"
    assert first.stdout.splitlines()[1] != second.stdout.splitlines()[1]
