"""Cost of the VMM jail on a clone's start: FISSION_JAIL=on vs off, interleaved.

Times ``Driver.start`` of a clone of the Python snapshot (QEMU start, restore, the agent's
HELLO) and its destroy, alternating jailed and unjailed starts so host noise hits both alike,
plus the jail's own set-up (uid slot, cgroups, lent files) without QEMU. Needs root and bwrap.
Prints a table and appends it to docs/benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import time

from benchlib import Row, append_section, host_line, markdown_table, print_table

from fission.core.snapshots import warm_template
from fission.images.store import image_set
from fission.vmm import jail_plan, jailer
from fission.vmm.base import default_driver
from fission.vmm.qemu_argv import TCG_TB_SIZE_MB
from fission.vmm.qemu_driver import clone_config, detect_host
from fission.vmm.qemu_snapshots import build_snapshot


async def measure(runs: int) -> tuple[list[Row], str]:
    """Rows of samples (ms) and the accelerator."""
    images = image_set("python")
    host = await detect_host(images)
    driver = default_driver()
    snapshot = await build_snapshot(
        driver, images, host.accel, host.version, warm_template("python")
    )
    start: dict[str, list[float]] = {"on": [], "off": []}
    destroy: dict[str, list[float]] = {"on": [], "off": []}
    for index in range(runs + 1):  # the first round warms caches and is dropped
        for mode in ("on", "off") if index % 2 else ("off", "on"):
            os.environ["FISSION_JAIL"] = mode
            began = time.perf_counter()
            machine = await driver.start(clone_config(images, snapshot))
            started = time.perf_counter()
            await machine.destroy()
            if index:
                start[mode].append((started - began) * 1000)
                destroy[mode].append((time.perf_counter() - started) * 1000)
    set_up = []
    os.environ["FISSION_JAIL"] = "on"
    for _ in range(runs):
        config = clone_config(images, snapshot)
        config.workdir.mkdir(parents=True)
        began = time.perf_counter()
        box = jailer.Jail.for_vm(config, host.vmm, host.accel, TCG_TB_SIZE_MB)
        set_up.append((time.perf_counter() - began) * 1000)
        box.release()
        shutil.rmtree(config.workdir)
    rows: list[Row] = [
        ("clone start to HELLO, jailed", start["on"]),
        ("clone start to HELLO, unjailed", start["off"]),
        ("destroy, jailed (cgroups removed)", destroy["on"]),
        ("destroy, unjailed", destroy["off"]),
        ("jail set-up alone (slot, cgroups, chown)", set_up),
    ]
    return rows, host.accel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not jail_plan.decide("auto", jailer.host_facts()).enabled:
        raise SystemExit("bench_jail: the jail needs root, bwrap and setpriv")
    rows, accel = asyncio.run(measure(args.runs))
    print_table("VMM jail cost", rows)
    cost = statistics.median(rows[0][1]) - statistics.median(rows[1][1])
    print(f"jail cost on a clone's start: {cost:.1f} ms (difference of medians)")
    if not args.no_write:
        layout = jailer.host_facts().layout
        append_section(
            "VMM jail cost (bench_jail.py)",
            [
                host_line(accel),
                f"cgroup {layout.version}; {args.runs} interleaved runs each.\n",
                *markdown_table(rows),
                f"\nThe jail adds {cost:.1f} ms to a clone's start (difference of medians).",
            ],
        )


if __name__ == "__main__":
    main()
