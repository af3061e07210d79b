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
import sys
import time
from pathlib import Path

from benchlib import (
    Row,
    append_section,
    fission_cli,
    host_line,
    markdown_table,
    print_table,
    time_command,
)

from fission.core.execution import execute
from fission.core.languages import resolve_language
from fission.core.limits import Limits
from fission.core.machines import exec_request
from fission.core.orchestrator import boot
from fission.core.snapshots import ensure_template
from fission.core.spec import RunSpec
from fission.vmm.base import default_driver

CODE = "print(42)"


async def time_boots(spec: RunSpec, warm: bool, runs: int) -> tuple[list[float], str]:
    """Ms from ``boot`` to the agent's HELLO, ``runs`` times; also the accelerator used."""
    samples, accel = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        vm, agent = await boot(spec, warm=warm)
        try:
            samples.append((time.perf_counter() - started) * 1000)
            accel = vm.capabilities().accel
        finally:
            await agent.close()
            await vm.destroy()
    return samples, accel


async def time_execs(spec: RunSpec, warm: bool, execs: int) -> list[float]:
    """Boot one VM, then ms per ``execute`` call, ``execs`` times; the VM is always destroyed."""
    vm, agent = await boot(spec, warm=warm)
    samples = []
    try:
        for _ in range(execs):
            started = time.perf_counter()
            result = (await execute(agent, exec_request(spec), diagnostics=vm.diagnostics)).result
            samples.append((time.perf_counter() - started) * 1000)
            if result.exit_code != 0 or result.stdout != b"42\n":
                raise SystemExit(f"bench: exec in VM gave {result}")
    finally:
        await agent.close()
        await vm.destroy()
    return samples


async def measure(runs: int, execs: int) -> tuple[list[Row], str, str]:
    """Every measurement as rows of ms samples, plus the accelerator and the QEMU version."""
    spec = RunSpec(resolve_language("python"), CODE, Limits())
    host = await default_driver().host()
    # built once if missing, so no run below pays for it
    await ensure_template(default_driver(), "python")
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
    heading = f"Run path ({accel}, QEMU {qemu}, --runs {runs}, --execs {execs})"
    append_section(heading, [host_line(accel), *markdown_table(rows)])


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
    print_table(f"python print(42), {accel}, QEMU {qemu} (wall-clock ms)", rows)
    if not args.no_write:
        record(rows, accel, qemu, args.runs, args.execs)


if __name__ == "__main__":
    main()
