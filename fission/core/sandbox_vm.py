"""The VM under a persistent sandbox: started with a disk of its own, paused to files, resumed.

A one-shot clone's writes go to a throwaway overlay inside QEMU (``snapshot=on``). A sandbox
instead gets a qcow2 overlay file in its own directory, on top of the same read-only base, so
its files survive a pause: pausing asks the agent to sync, migrates the whole guest state into
``state`` and stops QEMU; resuming starts a new QEMU with the same shape, the same disk and
``-incoming`` from that file, then sends the wall clock and a fresh seed like any restore.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from fission.core import snapshots
from fission.core.machines import Host, Machine, detect_host, new_vm_id, start_machine
from fission.core.orchestrator import clone_config, cold_config, ensure_snapshot
from fission.core.spec import RunSpec
from fission.images.overlay import create_overlay
from fission.images.store import image_set
from fission.vmm.base import VMConfig

PAUSE_TIMEOUT = 120.0
DISK_NAME = "disk.qcow2"
STATE_NAME = "state"


async def sandbox_config(spec: RunSpec, directory: Path) -> tuple[VMConfig, Host]:
    """The VM config of a new sandbox: a snapshot clone when its limits fit, else a cold boot."""
    images = image_set(spec.language.image)
    host = await detect_host(images)
    disk = directory / DISK_NAME
    if snapshots.fits(spec.limits):
        snapshot = await ensure_snapshot(images, host)
        config = clone_config(images, snapshot)
        base = snapshot.scratch
    else:
        config = await cold_config(images, spec, host.accel)
        base = config.scratch
    await asyncio.to_thread(create_overlay, base, disk)
    config = dataclasses.replace(
        config, scratch=disk, scratch_format="qcow2", scratch_writable=True
    )
    return config, host


async def start_sandbox_vm(spec: RunSpec, directory: Path) -> tuple[Machine, VMConfig, Host]:
    """Start a new sandbox's VM in ``directory``; nothing is left there if it fails."""
    config, host = await sandbox_config(spec, directory)
    try:
        machine = await start_machine(config, host)
    except BaseException:
        (directory / DISK_NAME).unlink(missing_ok=True)
        raise
    return machine, config, host


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


async def resume_vm(config: VMConfig, host: Host, directory: Path) -> tuple[Machine, VMConfig]:
    """Start a VM shaped like ``config`` from the state a pause saved in ``directory``."""
    vm_id = new_vm_id()
    resumed = dataclasses.replace(
        config,
        vm_id=vm_id,
        workdir=config.workdir.parent / f"vm-{vm_id}",
        incoming=directory / STATE_NAME,
    )
    machine = await start_machine(resumed, host)
    (directory / STATE_NAME).unlink(missing_ok=True)
    return machine, resumed
