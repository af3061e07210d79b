"""Snapshots and forks of a persistent sandbox, side by side with pause and resume.

Embedded (a private ``Service`` in this process, no pool): one Python sandbox with a variable in
a context and a file; then ``--rounds`` times each: pause, resume, snapshot (deleted again),
fork(1) and, fewer times, fork(4) (each clone deleted again after one run). Wall-clock ms per
step; then the PSS of the parent's QEMU beside that of four forked clones (each after one run in
its context), and what a snapshot takes on disk. Prints tables; ``--append`` adds them to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchlib import Row, append_section, markdown_table, print_table, pss_mib

from fission.core.languages import resolve_language
from fission.core.sandbox_spec import SandboxSpec
from fission.core.service import Service, ServiceConfig, private_service
from fission.vmm.qemu import QemuVM

PYTHON = SandboxSpec(resolve_language("python"))


async def timed(step: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    """Wall-clock ms of ``step()``, ``runs`` times."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await step()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def qemu_pss(service: Service, sandbox_id: str) -> float:
    """PSS (MiB) of the QEMU process of a running sandbox."""
    box = service.sandboxes._sandboxes[sandbox_id]
    assert box.machine is not None
    vm = box.machine.vm
    assert isinstance(vm, QemuVM) and vm.vmm_pid is not None
    return pss_mib(vm.vmm_pid)["Pss"]


async def measure(service: Service, rounds: int) -> tuple[list[Row], list[str]]:
    """The step timings and the memory and disk facts."""
    sandboxes = service.sandboxes
    snaps = sandboxes.snapshots
    parent = await sandboxes.create(PYTHON)
    await sandboxes.run_code(parent.id, "x = 41", context="c")
    await sandboxes.exec_command(parent.id, "head -c 1000000 /dev/urandom > data.bin")

    async def pause_resume() -> tuple[float, float]:
        started = time.perf_counter()
        await sandboxes.pause(parent.id)
        paused = time.perf_counter()
        await sandboxes.resume(parent.id)
        return (paused - started) * 1000, (time.perf_counter() - paused) * 1000

    pauses, resumes = [], []
    for _ in range(rounds):
        pause_ms, resume_ms = await pause_resume()
        pauses.append(pause_ms)
        resumes.append(resume_ms)
    state_bytes: list[int] = []

    async def snapshot() -> None:
        record = await snaps.snapshot(parent.id)
        state_bytes.append(record.size_bytes)
        await snaps.delete(record.id)

    async def fork(n: int) -> None:
        _snapshot, clones = await snaps.fork(parent.id, n)
        for clone in clones:
            await sandboxes.delete(clone.id)

    snapshot_ms = await timed(snapshot, rounds)
    fork1 = await timed(lambda: fork(1), rounds)
    fork4 = await timed(lambda: fork(4), max(1, rounds // 2))
    rows: list[Row] = [
        ("pause (sync, save state, stop)", pauses),
        ("resume (verify, restore, HELLO)", resumes),
        ("snapshot (sync, save, copy disk, cont)", snapshot_ms),
        ("fork(1): snapshot + 1 clone running", fork1),
        ("fork(4): snapshot + 4 clones running", fork4),
    ]
    # memory: the parent against four clones that each ran once in the shared context
    await sandboxes.run_code(parent.id, "print(x)", context="c")
    _snapshot, clones = await snaps.fork(parent.id, 4)
    for clone in clones:
        await sandboxes.run_code(clone.id, "print(x)", context="c")
    parent_pss = qemu_pss(service, parent.id)
    clone_pss = [qemu_pss(service, clone.id) for clone in clones]
    directory = snaps.store.directory(_snapshot.id)
    state_mib = (directory / "state").stat().st_size / 2**20
    disk_mib = (directory / "disk.qcow2").stat().st_blocks * 512 / 2**20
    facts = [
        f"- PSS of the parent's QEMU: {parent_pss:.0f} MiB; of four forked clones: "
        + ", ".join(f"{p:.0f}" for p in clone_pss)
        + f" MiB (median {statistics.median(clone_pss):.0f})",
        f"- one snapshot on disk: state {state_mib:.0f} MiB (the guest's RAM in the migration "
        f"stream), disk copy {disk_mib:.1f} MiB (the clusters the sandbox wrote); "
        f"median size {statistics.median(state_bytes) / 2**20:.0f} MiB",
    ]
    for clone in clones:
        await sandboxes.delete(clone.id)
    await sandboxes.delete(parent.id)
    return rows, facts


async def run(rounds: int) -> tuple[list[Row], list[str]]:
    """Measure in a private service of its own."""

    def config(state_dir: Path) -> ServiceConfig:
        return ServiceConfig(state_dir=state_dir, pools={}, memory_budget_mb=12288)

    async with private_service("bench-fork-", config) as service:
        return await measure(service, rounds)


def main() -> None:
    """Parse flags, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="times each step is measured")
    parser.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rows, facts = asyncio.run(run(args.rounds))
    title = f"sandbox snapshot and fork (embedded, {os.cpu_count()} cores, wall-clock ms)"
    print_table(title, rows)
    print("\n".join(facts))
    if args.append:
        append_section(
            "Sandbox snapshots and forks (bench_fork.py)", [*markdown_table(rows), "", *facts]
        )


if __name__ == "__main__":
    main()
