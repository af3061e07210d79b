"""Stateful Python code contexts on a real VM, and back-to-back runs taking the warm path.

One VM serves the whole module; each test uses context ids of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import Machine, exec_request
from fission.core.spec import RunSpec
from fission.errors import InvalidInput
from tests.integration.module_vm import boot_python, leftovers, run

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]
KILLED_WITHIN = 20.0  # s: a KILL that missed its program leaves the run going for its 120 s


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


async def test_back_to_back_runs_all_find_a_warm_interpreter(machine: Machine) -> None:
    runs = [await run(machine, f"print({i} * 2)") for i in range(8)]
    assert [r.stdout for r in runs] == [f"{i * 2}\n".encode() for i in range(8)]
    assert [r.outcome.warm for r in runs] == [True] * 8


async def test_variables_survive_and_the_last_expression_is_shown(machine: Machine) -> None:
    first = await run(machine, "x = 41", context="basic")
    assert (first.outcome.exit_code, first.stdout, first.outcome.context_reset) == (0, b"", False)
    second = await run(machine, "x + 1", context="basic")
    assert (second.outcome.exit_code, second.stdout) == (0, b"42\n")
    assert second.outcome.warm
    # Imports and functions survive too; a None value and a print are not shown twice.
    await run(machine, "import math\ndef f(n):\n    return math.factorial(n)", context="basic")
    assert (await run(machine, "f(5)", context="basic")).stdout == b"120\n"
    assert (await run(machine, "print('once')", context="basic")).stdout == b"once\n"
    assert (await run(machine, "None", context="basic")).stdout == b""
    shown = await run(machine, "import numpy as np\nnp.arange(3)", context="basic")
    assert shown.stdout == b"array([0, 1, 2])\n"


async def test_an_exception_keeps_the_context(machine: Machine) -> None:
    await run(machine, "y = 5", context="errors")
    failed = await run(machine, "def g():\n    return 1 / 0\ng()", context="errors")
    assert failed.outcome.exit_code == 1 and failed.stdout == b""
    assert b"ZeroDivisionError" in failed.stderr and b"return 1 / 0" in failed.stderr
    assert b"context.py" not in failed.stderr  # the kernel's own frames are not shown
    syntax = await run(machine, "y +", context="errors")
    assert syntax.outcome.exit_code == 1 and b"SyntaxError" in syntax.stderr
    exited = await run(machine, "import sys\nsys.exit(3)", context="errors")
    assert exited.outcome.exit_code == 3 and not exited.outcome.context_reset
    after = await run(machine, "y", context="errors")
    assert (after.stdout, after.outcome.context_reset) == (b"5\n", False)


async def test_a_timeout_resets_the_context(machine: Machine) -> None:
    await run(machine, "z = 1", context="timeout")
    stuck = await run(machine, "while True:\n    pass", context="timeout", timeout=2)
    assert stuck.outcome.timed_out and stuck.outcome.context_reset
    fresh = await run(machine, "z", context="timeout")
    assert fresh.outcome.context_reset
    assert fresh.outcome.exit_code == 1 and b"NameError" in fresh.stderr
    steady = await run(machine, "z = 2\nz", context="timeout")
    assert (steady.stdout, steady.outcome.context_reset) == (b"2\n", False)


async def test_running_out_of_memory_resets_the_context(machine: Machine) -> None:
    await run(machine, "keep = 1", context="oom", memory_mb=128)
    bomb = "chunks = []\nwhile True:\n    chunks.append(b'x' * (8 * 1024 * 1024))"
    blown = await run(machine, bomb, context="oom", memory_mb=128, timeout=60)
    assert blown.outcome.oom and blown.outcome.context_reset
    assert (await run(machine, "'keep' in dir()", context="oom")).stdout == b"False\n"


async def test_fresh_context_drops_the_variables(machine: Machine) -> None:
    await run(machine, "a = 1", context="fresh")
    dropped = await run(machine, "a", context="fresh", fresh_context=True)
    assert dropped.outcome.exit_code == 1 and b"NameError" in dropped.stderr
    assert not dropped.outcome.context_reset  # asked for, not lost


async def test_two_contexts_are_independent(machine: Machine) -> None:
    await run(machine, "v = 'one'", context="one")
    await run(machine, "v = 'two'", context="two")
    assert (await run(machine, "v", context="one")).stdout == b"'one'\n"
    assert (await run(machine, "v", context="two")).stdout == b"'two'\n"
    # A run without a context sees neither.
    plain = await run(machine, "print('v' in dir())")
    assert plain.stdout == b"False\n"


async def test_output_streams_and_the_cap_apply_to_context_runs(machine: Machine) -> None:
    code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nprint('x' * 5000)"
    ran = await run(machine, code, context="output", output_limit_mb=0.002)
    assert ran.stdout.startswith(b"out\n") and ran.stderr == b"err\n"
    assert ran.outcome.output_truncated
    assert len(ran.stdout) + len(ran.stderr) == Limits(output_limit_mb=0.002).output_limit_bytes


async def test_drop_context(machine: Machine) -> None:
    await run(machine, "w = 1", context="drop")
    assert await machine.agent.drop_context("drop", timeout=10) is True
    assert await machine.agent.drop_context("drop", timeout=10) is False
    after = await run(machine, "'w' in dir()", context="drop")
    assert after.stdout == b"False\n" and not after.outcome.context_reset


async def test_contexts_are_for_python_only(machine: Machine) -> None:
    # The python VM runs argv programs too: an "exec" request with a context is refused.
    with pytest.raises(InvalidInput, match="python"):
        await run(machine, "print(1)", context="shell", mode="exec", argv=["bash", "-c"])
    with pytest.raises(InvalidInput, match="context id"):
        await run(machine, "print(1)", context="no spaces")
    assert (await run(machine, "print('still serving')")).stdout == b"still serving\n"


async def test_each_run_gets_random_streams_of_its_own(machine: Machine) -> None:
    # Warm children are forked ahead of time from one fork server; each reseeds once forked
    # (after the VM's INIT), the one saved in the snapshot again at its run.
    full = (
        "import os, random, numpy\nprint(os.urandom(8).hex(), random.random(), numpy.random.rand())"
    )
    lean = "import os, random\nprint(os.urandom(8).hex(), random.random())"
    runs = [await run(machine, full) for _ in range(3)] + [
        await run(machine, lean) for _ in range(3)
    ]
    assert all(r.outcome.exit_code == 0 and r.outcome.warm for r in runs)
    columns = list(zip(*(r.stdout.split() for r in runs[:3]), strict=True))
    columns += list(zip(*(r.stdout.split() for r in runs[3:]), strict=True))
    for values in columns:
        assert len(set(values)) == len(values), values


async def test_commands_run_in_a_warm_child_inside_the_same_box(machine: Machine) -> None:
    probe = (
        "id -u; id -G; grep NoNewPrivs /proc/self/status | tr -d ' \\t'; "
        "cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); echo $cg; "
        "cat $cg/memory.max $cg/pids.max $cg/memory.swap.max $cg/memory.oom.group"
    )
    ran = [
        await run(machine, "", argv=["/bin/sh", "-c", probe], mode="exec", script=None)
        for _ in range(2)
    ]
    for r in ran:
        uid, groups, nnp, _, memory, pids, swap, group_kill = r.stdout.decode().split()
        assert (uid, groups, nnp) == ("1000", "1000", "NoNewPrivs:1")
        assert int(memory) == Limits().memory_mb * 1024 * 1024 and int(pids) == Limits().pids
        assert (swap, group_kill) == ("0", "1")
    assert ran[0].stdout.split()[3] != ran[1].stdout.split()[3]  # a cgroup per run
    missing = await run(machine, "", argv=["/no/such/program"], mode="exec", script=None)
    assert missing.outcome.exit_code == 127
    assert missing.stderr.startswith(b"fission: cannot start program: FileNotFoundError")


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.2])
async def test_a_kill_right_after_the_start_ends_the_run(machine: Machine, delay: float) -> None:
    # Back to back, each run takes a warm child forked just after the previous one ended, which
    # may not have confined itself yet: the KILL must reach it all the same, on every path.
    python = exec_request(RunSpec(resolve_language("python"), "", Limits(timeout=300)))
    sleep = "import time\ntime.sleep(120)"
    requests = {
        "command (lean child)": dataclasses.replace(
            python, argv=["sleep", "120"], script=None, mode="exec"
        ),
        "stdlib script (lean child)": dataclasses.replace(python, script=sleep),
        "numpy script (full child)": dataclasses.replace(python, script=f"import numpy\n{sleep}"),
        "new context": dataclasses.replace(python, script=sleep, context="killed"),
    }
    for what, request in requests.items():
        request_id = machine.agent._next_request  # the id this run gets: the one to KILL
        running = asyncio.create_task(machine.agent.exec(request, lambda stream, data: None))
        await asyncio.sleep(delay)
        await machine.agent.kill(request_id)
        try:
            async with asyncio.timeout(KILLED_WITHIN):
                outcome = await running
        except TimeoutError:
            pytest.fail(f"{what}: killed {delay} s after its start, it went on running")
        assert (outcome.exit_code, outcome.signal, outcome.timed_out) == (137, 9, False), what
    assert (await run(machine, "print('still serving')")).stdout == b"still serving\n"
