"""The VM under a persistent sandbox: started with a disk of its own, paused to files, resumed.

A one-shot clone's writes vanish with it. A sandbox instead asks the driver for a disk of its
own in the sandbox's directory (for QEMU a qcow2 overlay on the same read-only base), so its
files survive a pause: pausing asks the agent to sync, saves the whole guest state into
``state`` and stops the VM; resuming starts a new VM with the same shape, the same disk and the
state restored from that file, then sends the wall clock and a fresh seed like any restore.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fission.core import snapshots
from fission.core.spec import RunSpec
from fission.vmm.base import DISK_NAME, STATE_NAME, Driver, Machine, VMConfig

__all__ = ["DISK_NAME", "PAUSE_TIMEOUT", "STATE_NAME", "pause_vm", "resume_vm", "start_sandbox_vm"]

PAUSE_TIMEOUT = 120.0


async def start_sandbox_vm(
    driver: Driver, spec: RunSpec, directory: Path, *, detached: bool = False
) -> tuple[Machine, VMConfig]:
    """Start a new sandbox's VM with its disk in ``directory``; no disk is left if it fails.
    ``detached``: the VM outlives this process (a daemon's durable sandboxes)."""
    try:
        config = await driver.configure(snapshots.vm_request(spec, disk_dir=directory))
        config = dataclasses.replace(config, detached=detached)
        return await driver.start(config), config
    except BaseException:
        (directory / DISK_NAME).unlink(missing_ok=True)
        raise


async def pause_vm(machine: Machine, directory: Path) -> Path:
    """Sync the guest, save its whole state to ``directory/state`` and stop the VM."""
    state = directory / STATE_NAME
    try:
        await machine.agent.prepare_snapshot(PAUSE_TIMEOUT)
        await machine.vm.save_state(state)
    except BaseException:
        state.unlink(missing_ok=True)
        raise
    finally:
        await machine.destroy()
    return state


async def resume_vm(driver: Driver, config: VMConfig, directory: Path) -> tuple[Machine, VMConfig]:
    """Start a VM shaped like ``config`` from the state a pause saved in ``directory``."""
    resumed = driver.restored(config, directory, keep_writes=True)
    machine = await driver.start(resumed)
    (directory / STATE_NAME).unlink(missing_ok=True)
    return machine, resumed
