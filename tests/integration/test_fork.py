"""Snapshots, forks, rewind and integrity of sandboxes on real QEMU VMs.

One private Service serves the module: a parent sandbox with a variable in a context, a file and
a background process is forked three times; the forks and the parent are then used by each test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxRecord, SandboxSpec, SandboxState
from fission.core.service import Service, ServiceConfig, private_service
from fission.errors import IntegrityError
from fission.vmm.base import STATE_NAME

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

PYTHON = SandboxSpec(resolve_language("python"))
# The processes of a run end with it; what lives on in a sandbox is a context's kernel. A
# background thread there counts up every 0.1 s: it is alive when the count grows.
TICKER = """
import threading, time
ticks = 0
def tick():
    global ticks
    while True:
        ticks += 1
        time.sleep(0.1)
threading.Thread(target=tick, daemon=True).start()
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service() -> AsyncIterator[Service]:
    def config(state_dir: Path) -> ServiceConfig:
        return ServiceConfig(state_dir=state_dir, pools={}, memory_budget_mb=8192)

    runtime = os.environ["FISSION_RUNTIME_DIR"]
    try:
        async with private_service("fork-test-", config) as started:
            yield started
    finally:
        os.environ["FISSION_RUNTIME_DIR"] = runtime


@pytest.fixture(autouse=True)
def no_leftovers() -> None:
    """Overrides the session check: the module's sandboxes stay between tests."""


async def run(service: Service, sandbox_id: str, code: str, context: str | None = None) -> str:
    result = await service.sandboxes.run_code(sandbox_id, code, context=context)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


async def shell(service: Service, sandbox_id: str, command: str) -> str:
    result = await service.sandboxes.exec_command(sandbox_id, command)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


async def ticking(service: Service, sandbox_id: str) -> bool:
    before = int(await run(service, sandbox_id, "print(ticks)", context="c"))
    await shell(service, sandbox_id, "sleep 0.5")
    return int(await run(service, sandbox_id, "print(ticks)", context="c")) > before


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def family(service: Service) -> tuple[SandboxRecord, list[SandboxRecord]]:
    parent = await service.sandboxes.create(PYTHON)
    await run(service, parent.id, "secret = 'parent-value'", context="c")
    await run(service, parent.id, TICKER, context="c")
    await shell(service, parent.id, "echo from-parent > note.txt")
    _snapshot, forks = await service.sandboxes.snapshots.fork(parent.id, 3)
    return parent, forks


async def test_forks_see_the_parents_state_and_write_their_own(
    service: Service, family: tuple[SandboxRecord, list[SandboxRecord]]
) -> None:
    parent, forks = family
    assert len(forks) == 3
    for index, fork in enumerate(forks):
        assert (await run(service, fork.id, "print(secret)", context="c")) == "parent-value\n"
        assert await shell(service, fork.id, "cat note.txt") == "from-parent\n"
        assert await ticking(service, fork.id), "the background thread did not survive the fork"
        await shell(service, fork.id, f"echo fork-{index} > note.txt")
        await run(service, fork.id, f"secret = 'fork-{index}'", context="c")
    for index, fork in enumerate(forks):
        assert await shell(service, fork.id, "cat note.txt") == f"fork-{index}\n"
        assert (await run(service, fork.id, "print(secret)", context="c")) == f"fork-{index}\n"
    # the parent goes on after the snapshot, unchanged by its forks
    assert await shell(service, parent.id, "cat note.txt") == "from-parent\n"
    assert (await run(service, parent.id, "print(secret)", context="c")) == "parent-value\n"
    assert await ticking(service, parent.id)


async def test_each_fork_has_its_own_randomness(
    service: Service, family: tuple[SandboxRecord, list[SandboxRecord]]
) -> None:
    parent, forks = family
    code = "import os; print(os.urandom(16).hex())"
    draws = [await run(service, box.id, code) for box in [parent, *forks]]
    assert len(set(draws)) == 4
    kernel = "head -c 16 /dev/urandom | od -An -tx1"
    assert len({await shell(service, box.id, kernel) for box in [parent, *forks]}) == 4


async def test_rewind_restores_the_file_and_the_variable(
    service: Service, family: tuple[SandboxRecord, list[SandboxRecord]]
) -> None:
    box = family[1][0]
    await shell(service, box.id, "echo before > step.txt")
    step = await service.sandboxes.run_code(box.id, "step = 1", context="c", checkpoint=True)
    assert step.checkpoint_id is not None
    await shell(service, box.id, "echo after > step.txt")
    await run(service, box.id, "step = 2", context="c")
    rewound = await service.sandboxes.snapshots.rewind(box.id, step.checkpoint_id)
    assert rewound.id == box.id and rewound.state == SandboxState.RUNNING
    assert await shell(service, box.id, "cat step.txt") == "before\n"
    assert (await run(service, box.id, "print(step)", context="c")) == "1\n"


async def test_a_corrupted_state_is_refused_on_resume_and_nothing_is_lost(
    service: Service, family: tuple[SandboxRecord, list[SandboxRecord]]
) -> None:
    box = family[1][1]
    sandboxes = service.sandboxes
    await sandboxes.pause(box.id)
    state = service.journal.sandboxes_dir / box.id / STATE_NAME
    original = state.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0x55
    state.write_bytes(bytes(corrupted))
    with pytest.raises(IntegrityError, match="no longer matches"):
        await sandboxes.resume(box.id)
    assert sandboxes.get(box.id).state == SandboxState.PAUSED
    state.write_bytes(original)
    await sandboxes.resume(box.id)
    assert await shell(service, box.id, "cat note.txt") == "fork-1\n"
