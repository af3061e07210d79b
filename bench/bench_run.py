"""Where a run's time goes: the CLI end to end, boot to agent, exec in a running VM, host python.

Measures, in one process and one sitting: ``fission run`` as a subprocess (spawn to exit), boot to
the agent's HELLO for a clone of the warm snapshot (what ``fission run`` uses) and for a cold boot,
repeated execs of ``print(42)`` in an already running VM of each kind, and ``python3 -c`` on the
host as a baseline. Prints a table and appends it, with the host and QEMU details, to
docs/benchmarks.md (unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import detect_host
from fission.core.orchestrator import boot, ensure_snapshot, run_in_vm
from fission.core.spec import RunSpec
from fission.images.store import image_set

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
CODE = "print(42)"
COLUMNS = ("measurement", "n", "median ms", "p90 ms", "min ms", "max ms")

Row = tuple[str, list[float]]


def p90(samples: list[float]) -> float:
    """The 90th percentile by nearest rank."""
    ordered = sorted(samples)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def cells(row: Row) -> list[str]:
    """A row's name and sample count, then median, p90, min and max in milliseconds."""
    name, samples = row
    stats = (statistics.median(samples), p90(samples), min(samples), max(samples))
    return [name, str(len(samples)), *(f"{value:.0f}" for value in stats)]


def fission_cli() -> str:
    """The ``fission`` entry point next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "fission"
    found = str(beside) if beside.exists() else shutil.which("fission")
    if found is None:
        raise SystemExit("bench: no `fission` command next to this python or on PATH")
    return found


async def time_command(argv: list[str], runs: int) -> list[float]:
    """Wall-clock ms from spawn to exit of ``argv``, ``runs`` times; each must print 42."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        samples.append((time.perf_counter() - started) * 1000)
        if proc.returncode != 0 or out != b"42\n":
            raise SystemExit(f"bench: {argv[0]} exited {proc.returncode}: {out!r} {err!r}")
    return samples


async def time_boots(spec: RunSpec, warm: bool, runs: int) -> tuple[list[float], str]:
    """Ms from ``boot`` to the agent's HELLO, ``runs`` times; also the accelerator used."""
    samples, accel = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        vm, agent = await boot(spec, warm=warm)
        try:
            samples.append((time.perf_counter() - started) * 1000)
            accel = vm.accel
        finally:
            await agent.close()
            await vm.destroy()
    return samples, accel


async def time_execs(spec: RunSpec, warm: bool, execs: int) -> list[float]:
    """Boot one VM, then ms per ``run_in_vm`` call, ``execs`` times; the VM is always destroyed."""
    vm, agent = await boot(spec, warm=warm)
    samples = []
    try:
        for _ in range(execs):
            started = time.perf_counter()
            result = await run_in_vm(vm, agent, spec)
            samples.append((time.perf_counter() - started) * 1000)
            if result.exit_code != 0 or result.stdout != b"42\n":
                raise SystemExit(f"bench: exec in VM gave {result}")
    finally:
        await agent.close()
        await vm.destroy()
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


async def measure(runs: int, execs: int) -> tuple[list[Row], str, str]:
    """Every measurement as rows of ms samples, plus the accelerator and the QEMU version."""
    spec = RunSpec(resolve_language("python"), CODE, Limits())
    images = image_set("python")
    host = await detect_host(images)
    await ensure_snapshot(images, host)  # built once if missing, so no run below pays for it
    cli = [fission_cli(), "run", "--no-daemon", "--lang", "python", CODE]
    rows: list[Row] = [("cli: fission run, spawn to exit", await time_command(cli, runs))]
    warm_boots, accel = await time_boots(spec, True, runs)
    cold_boots, cold_accel = await time_boots(spec, False, runs)
    if cold_accel != accel:
        raise SystemExit(f"bench: warm boots used {accel}, cold boots {cold_accel}")
    rows += [
        ("boot to HELLO: snapshot clone", warm_boots),
        ("boot to HELLO: cold boot", cold_boots),
        ("exec in VM: snapshot clone", await time_execs(spec, True, execs)),
        ("exec in VM: cold-booted", await time_execs(spec, False, execs)),
    ]
    pythons = dict.fromkeys(p for p in ("/usr/bin/python3", sys.executable) if Path(p).exists())
    for python in pythons:
        rows.append((f"host: {python} -c", await time_command([python, "-c", CODE], runs)))
    return rows, accel, host.version


def record(rows: list[Row], accel: str, qemu: str, runs: int, execs: int) -> None:
    """Append a dated section with the host details and the table to docs/benchmarks.md."""
    facts = host_facts()
    day = time.strftime("%Y-%m-%d %H:%M")
    lines = [
        f"\n## Run path, {day} ({accel}, QEMU {qemu}, --runs {runs}, --execs {execs})\n",
        f"Host: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram']} RAM, "
        f"kernel {facts['kernel']}; accelerator {accel}.\n",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    with DOCS.open("a") as docs:
        if docs.tell() == 0:
            docs.write("# fission benchmarks\n")
        docs.write("\n".join(lines) + "\n")


def main() -> None:
    """Parse flags, measure, print the table and record it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="CLI runs, boots, host runs each")
    parser.add_argument("--execs", type=int, default=20, help="execs in each running VM")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    if args.runs < 1 or args.execs < 1:
        parser.error("--runs and --execs must be at least 1")
    rows, accel, qemu = asyncio.run(measure(args.runs, args.execs))
    table = Table(title=f"python print(42), {accel}, QEMU {qemu} (wall-clock ms)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console().print(table)
    if not args.no_write:
        record(rows, accel, qemu, args.runs, args.execs)


if __name__ == "__main__":
    main()
