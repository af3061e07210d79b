"""Shared parts of the benchmarks: percentiles, table rows, host facts, timing a command, docs."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
COLUMNS = ("measurement", "n", "median ms", "p90 ms", "p99 ms", "min ms", "max ms")

Row = tuple[str, list[float]]


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``samples`` by nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def p90(samples: list[float]) -> float:
    """The 90th percentile by nearest rank."""
    return percentile(samples, 0.9)


def cells(row: Row) -> list[str]:
    """A row's name and sample count, then median, p90, p99, min and max in milliseconds."""
    name, samples = row
    stats = (
        statistics.median(samples),
        percentile(samples, 0.9),
        percentile(samples, 0.99),
        min(samples),
        max(samples),
    )
    return [name, str(len(samples)), *(f"{value:.1f}" for value in stats)]


def print_table(title: str, rows: list[Row]) -> None:
    """Print ``rows`` as a rich table."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console().print(table)


def markdown_table(rows: list[Row]) -> list[str]:
    """``rows`` as the lines of a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    return lines + ["| " + " | ".join(cells(row)) + " |" for row in rows]


def fission_cli() -> str:
    """The ``fission`` entry point next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "fission"
    found = str(beside) if beside.exists() else shutil.which("fission")
    if found is None:
        raise SystemExit("bench: no `fission` command next to this python or on PATH")
    return found


async def time_command(
    argv: list[str], runs: int, env: Mapping[str, str] | None = None, expect: bytes = b"42\n"
) -> list[float]:
    """Wall-clock ms from spawn to exit of ``argv``, ``runs`` times; each must print ``expect``."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
        out, err = await proc.communicate()
        samples.append((time.perf_counter() - started) * 1000)
        if proc.returncode != 0 or out != expect:
            raise SystemExit(f"bench: {argv[0]} exited {proc.returncode}: {out!r} {err!r}")
    return samples


def host_facts() -> dict[str, str]:
    """nproc, CPU model, RAM and kernel of this host."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_kb = 0
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                ram_kb = int(line.split()[1])
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "ram": f"{ram_kb / 2**20:.1f} GiB",
        "kernel": platform.release(),
    }


def host_line(accel: str) -> str:
    """One markdown line naming this host and the accelerator."""
    facts = host_facts()
    return (
        f"Host: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram']} RAM, "
        f"kernel {facts['kernel']}; accelerator {accel}.\n"
    )


def append_section(heading: str, lines: list[str]) -> None:
    """Append ``## heading (date)`` and ``lines`` to docs/benchmarks.md."""
    day = time.strftime("%Y-%m-%d %H:%M")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    with DOCS.open("a") as docs:
        if docs.tell() == 0:
            docs.write("# fission benchmarks\n")
        docs.write("\n".join([f"\n## {heading}, {day}\n", *lines]) + "\n")
