"""The QEMU driver: finds the images, makes the disks and warm snapshots, starts ``QemuVM``\\s.

A cold VM boots the image's kernel and initramfs with the run's own CPUs, memory and an empty
scratch disk of the run's size (written copy-on-write, see ``qemu``). A clone restores the
image's warm snapshot (``qemu_snapshots``, built on first use, about ten seconds under TCG). A
VM with a disk of its own (sandboxes, derived snapshots) gets a qcow2 overlay on top of its base
disk in the directory it was given, so its writes survive a pause.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from fission.errors import VMError
from fission.images.overlay import create_overlay
from fission.images.scratch import scratch_disk
from fission.images.store import ImageSet, built_languages, image_set
from fission.vmm import jailer
from fission.vmm.accel import detect_accel, tcg_kernel_args
from fission.vmm.base import (
    DISK_NAME,
    TEMPLATE_MEMORY_MB,
    TEMPLATE_VCPUS,
    Driver,
    Host,
    VMConfig,
    VMRequest,
    new_vm_id,
    vm_workdir,
)
from fission.vmm.binary import qemu_binary, qemu_version
from fission.vmm.qemu import QemuVM
from fission.vmm.qemu_snapshots import Snapshot, build_snapshot


async def detect_host(images: ImageSet) -> Host:
    """The QEMU to use, its version and the accelerator (probed once per host, cached)."""
    qemu = qemu_binary()
    version = qemu_version(qemu)
    accel = await detect_accel(qemu, version, images.kernel, images.initramfs)
    return Host(qemu, version, accel)


def cold_config(images: ImageSet, request: VMRequest, accel: str) -> VMConfig:
    """A VM booted from scratch: the request's CPUs, memory and (empty) disk size."""
    vm_id = new_vm_id()
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=scratch_disk(request.disk_mb),
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        workdir=vm_workdir(vm_id),
        kernel_args=tcg_kernel_args() if accel == "tcg" else (),
    )


def clone_config(images: ImageSet, snapshot: Snapshot) -> VMConfig:
    """A clone of ``snapshot``: the template's shape, private copy-on-write RAM and disk."""
    vm_id = new_vm_id()
    return VMConfig(
        vm_id=vm_id,
        kernel=images.kernel,
        initramfs=images.initramfs,
        rootfs=images.rootfs,
        scratch=snapshot.scratch,
        vcpus=TEMPLATE_VCPUS,
        memory_mb=TEMPLATE_MEMORY_MB,
        workdir=vm_workdir(vm_id),
        kernel_args=snapshot.kernel_args,
        memory_file=None if snapshot.full else snapshot.memory,
        memory_shared=False,
        incoming=snapshot.state,
        template=snapshot.directory,
    )


class QemuDriver(Driver):
    """QEMU microVMs (KVM when it works here, else TCG), jailed when fission runs as root."""

    name = "qemu"

    async def host(self) -> Host:
        """QEMU, its version and the accelerator, probed with the first built image's kernel."""
        built = built_languages()
        return await detect_host(image_set(built[0] if built else "python"))

    async def configure(self, request: VMRequest) -> VMConfig:
        """Find the image, build its warm snapshot if a clone needs it, make the disks."""
        images = image_set(request.image)
        host = await detect_host(images)
        if request.warm is not None:
            snapshot = await build_snapshot(self, images, host.accel, host.version, request.warm)
            config = clone_config(images, snapshot)
        else:
            config = await asyncio.to_thread(cold_config, images, request, host.accel)
        if request.disk_dir is not None:
            disk = request.disk_dir / DISK_NAME
            await asyncio.to_thread(create_overlay, config.scratch, disk)
            config = dataclasses.replace(
                config, scratch=disk, scratch_format="qcow2", scratch_writable=True
            )
        return config

    def layer_disk(self, base: Path, target: Path) -> None:
        """A qcow2 overlay ``target`` on a snapshot's qcow2 disk ``base``."""
        create_overlay(base, target, base_format="qcow2")

    async def create(self, config: VMConfig) -> QemuVM:
        """A QEMU VM for ``config`` under this host's accelerator."""
        qemu = qemu_binary()
        version = qemu_version(qemu)
        accel = await detect_accel(qemu, version, config.kernel, config.initramfs)
        return QemuVM(config, qemu, accel)

    async def adopt(self, config: VMConfig, attachment: dict[str, Any]) -> QemuVM:
        """The detached VM another daemon started, its vCPUs running again if they were
        stopped (an idle sandbox) so its agent can answer."""
        qemu = qemu_binary()
        version = qemu_version(qemu)
        accel = await detect_accel(qemu, version, config.kernel, config.initramfs)
        vm = QemuVM.adopt(config, qemu, accel, attachment)
        if vm.running():
            try:
                await vm.continue_if_stopped()
            except BaseException as exc:
                await vm.destroy()
                if isinstance(exc, Exception):
                    raise VMError(f"its VM's QMP socket does not answer: {exc}") from exc
                raise
        return vm

    def release_stale(self, vm_ids: list[str]) -> int:
        """Remove the jail cgroups of ``vm_ids`` and any other a crashed fission left empty."""
        return jailer.remove_stale_cgroups(vm_ids)
