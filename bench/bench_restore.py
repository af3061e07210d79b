"""Restore cost: clones mapping the template's RAM copy-on-write vs reading a full state file.

Prints a table (median and p90 over --runs restores each) of restore-to-agent-ready and
restore-plus-first-exec for both snapshot kinds, and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fission.core.execution import execute
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import exec_request
from fission.core.snapshots import warm_template
from fission.core.spec import RunSpec
from fission.images.store import image_set
from fission.vmm import qemu_snapshots as snapshots
from fission.vmm.base import default_driver
from fission.vmm.qemu_driver import clone_config, detect_host

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def summary(samples: list[float]) -> str:
    """Median and p90 in milliseconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"{statistics.median(ordered):.0f} / {p90:.0f}"


async def measure(snapshot: snapshots.Snapshot, runs: int) -> tuple[list[float], list[float]]:
    """Restore ``runs`` clones: (restore-to-ready ms, restore-plus-first-exec ms)."""
    images = image_set(snapshot.language)
    driver = default_driver()
    spec = RunSpec(resolve_language(snapshot.language), "print(42)", Limits())
    ready, first = [], []
    for _ in range(runs):
        started = time.perf_counter()
        machine = await driver.start(clone_config(images, snapshot))
        try:
            ready.append((time.perf_counter() - started) * 1000)
            request = exec_request(spec)
            execution = await execute(machine.agent, request, diagnostics=machine.vm.diagnostics)
            result = execution.result
            assert result.stdout == b"42\n", result
            first.append((time.perf_counter() - started) * 1000)
        finally:
            await machine.destroy()
    return ready, first


async def main(runs: int, write: bool) -> None:
    """Build both snapshot kinds if needed, measure, print, record."""
    images = image_set("python")
    host = await detect_host(images)
    kinds: dict[str, tuple[snapshots.Snapshot, float]] = {}
    for full in (False, True):
        snap = await snapshots.build_snapshot(
            default_driver(), images, host.accel, host.version, warm_template("python"), full
        )
        state = snap.state.stat().st_size / 2**20
        name = "full state file" if full else "template (RAM mapped copy-on-write)"
        kinds[name] = (snap, state)
    table = Table(title=f"python restores, {runs} each, {host.accel} (median / p90 ms)")
    columns = ("snapshot", "state file MB", "restore to agent ready", "restore + first exec")
    for column in columns:
        table.add_column(column)
    rows = []
    for name, (snap, state) in kinds.items():
        ready, first = await measure(snap, runs)
        rows.append((name, f"{state:.2f}", summary(ready), summary(first)))
        table.add_row(*rows[-1])
    Console().print(table)
    if write:
        day = time.strftime("%Y-%m-%d")
        lines = [
            f"\n## Restore cost, {day} ({host.accel}, QEMU {host.version}, median / p90 ms)\n",
            "| " + " | ".join(columns) + " |",
            "|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(row)} |" for row in rows]
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        with DOCS.open("a") as docs:
            docs.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.runs, not args.no_write))
