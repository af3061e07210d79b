"""One VM shared by a whole test module: boot it, run programs in it, check nothing else leaks.

A module that shares a VM overrides the session's per-test ``no_leftovers`` check with
``only_this_vm``: after each test the module's VM may remain, nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from fission.agent.client import ExecOutcome
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import Machine, exec_request
from fission.core.orchestrator import boot
from fission.core.spec import RunSpec
from tests.integration.conftest import vmm_processes


async def boot_python() -> Machine:
    """A Python VM (a clone of the warm snapshot)."""
    return await boot(RunSpec(resolve_language("python"), "pass", Limits(timeout=30)))


def process_tree(pid: int | None) -> set[int]:
    """``pid`` and all its descendants (a jailed VMM runs under bwrap, in its own pid tree)."""
    if pid is None:
        return set()
    found, todo = {pid}, [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(children - found)
            found |= children
    return found


def leftovers(runtime_dir: Path, machine: Machine | None) -> tuple[list[int], list[str]]:
    """VMM processes and VM directories of this session other than ``machine``'s."""
    own_pids = process_tree(machine.vm.pid if machine is not None else None)
    own_dir = machine.vm.config.workdir.name if machine is not None else None
    deadline = time.monotonic() + 5.0
    while True:
        pids = [pid for pid in vmm_processes(runtime_dir) if pid not in own_pids]
        dirs = sorted(p.name for p in runtime_dir.iterdir() if p.name != own_dir)
        if (not pids and not dirs) or time.monotonic() > deadline:
            return pids, dirs
        time.sleep(0.1)


@dataclasses.dataclass
class Ran:
    """What one program did: its outcome and its output."""

    outcome: ExecOutcome
    stdout: bytes
    stderr: bytes


async def run(machine: Machine, code: str, *, timeout: float = 30.0, **request: Any) -> Ran:
    """Run Python ``code`` in ``machine``; ``request`` overrides ExecRequest fields."""
    limits = {key: request.pop(key) for key in ("memory_mb", "output_limit_mb") if key in request}
    spec = RunSpec(resolve_language("python"), code, Limits(timeout=timeout, **limits))
    exec_req = dataclasses.replace(exec_request(spec), **request)
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    async with asyncio.timeout(timeout + 30):
        outcome = await machine.agent.exec(exec_req, lambda s, d: out[s].append(d))
    return Ran(outcome, b"".join(out["stdout"]), b"".join(out["stderr"]))
