"""Machines for runs: a clone of the language's warm snapshot when the limits fit, else a cold boot.

``boot`` starts one for a RunSpec (``boot_timeout``, ``FISSION_BOOT_TIMEOUT``, bounds VMM start
to agent HELLO); ``warm_clone`` makes one for a pool and warms it. Running programs in them is
``execution.execute``; the Service owns the machines and destroys each after one run.
"""

from __future__ import annotations

import asyncio

from fission.config import runtime_dir
from fission.core import snapshots
from fission.core.languages import Language
from fission.core.machines import (
    GUEST_OVERHEAD_MB,
    Host,
    Machine,
    detect_host,
    new_vm_id,
    start_machine,
)
from fission.core.spec import RunSpec
from fission.images.scratch import scratch_disk
from fission.images.store import ImageSet, image_set
from fission.vmm.accel import tcg_kernel_args
from fission.vmm.base import VMConfig


async def cold_config(images: ImageSet, spec: RunSpec, accel: str) -> VMConfig:
    """A VM booted from scratch for ``spec``: its own CPUs, memory and disk size."""
    vm_id = new_vm_id()
    scratch = await asyncio.to_thread(scratch_disk, spec.limits.disk_mb)
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=scratch,
        vcpus=spec.limits.cpus,
        memory_mb=spec.limits.memory_mb + GUEST_OVERHEAD_MB,
        workdir=runtime_dir() / f"vm-{vm_id}",
        kernel_args=tcg_kernel_args() if accel == "tcg" else (),
    )


def clone_config(images: ImageSet, snapshot: snapshots.Snapshot) -> VMConfig:
    """A clone of ``snapshot``: the template's shape, private copy-on-write RAM and disk."""
    vm_id = new_vm_id()
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=snapshot.scratch,
        vcpus=snapshots.TEMPLATE_VCPUS,
        memory_mb=snapshots.TEMPLATE_CAPACITY_MB + GUEST_OVERHEAD_MB,
        workdir=runtime_dir() / f"vm-{vm_id}",
        kernel_args=snapshot.kernel_args,
        memory_file=None if snapshot.full else snapshot.memory,
        memory_shared=False,
        incoming=snapshot.state,
    )


async def ensure_snapshot(images: ImageSet, host: Host) -> snapshots.Snapshot:
    """The language's snapshot, built now (once, about ten seconds under TCG) if missing."""
    return await snapshots.build_snapshot(images, host.qemu, host.version, host.accel)


async def boot(spec: RunSpec, *, warm: bool = True) -> Machine:
    """A ready VM for ``spec``: a clone of the warm snapshot when it fits, else a cold boot."""
    images = image_set(spec.language.image)
    host = await detect_host(images)
    if warm and snapshots.fits(spec.limits):
        snapshot = await ensure_snapshot(images, host)
        return await start_machine(clone_config(images, snapshot), host)
    return await start_machine(await cold_config(images, spec, host.accel), host)


async def warm_clone(language: Language) -> Machine:
    """A clone of the language's snapshot that has run its warm-up (for the pools).

    The warm-up translates the guest's hot paths in this QEMU process (its code cache starts
    empty) and uses up the fork server's first warm child; waiting for the next one means the
    user's run starts on a child that is already confined and waiting.
    """
    machine = await boot(RunSpec(language, language.warm_up))
    try:
        await snapshots.warm_up(machine.agent, language)
        await machine.agent.prepare_snapshot(snapshots.PREPARE_TIMEOUT)
    except BaseException:
        await machine.destroy()
        raise
    return machine
